"""Vocabulary-parallel loss on CPU: WORLD processes (gloo, one thread each), each holding a slice of
the vocabulary, against one process holding whole rows (with 1 and with WORLD threads).

    python benchmarks/vocab_parallel_bench.py [--rows 2048 --vocab 32000 --world 2]

Times forward + backward of the loss (median of --repeat calls after a warm-up); the parallel
time is the slowest process's. Also reports the bytes each process sends per row. Writes
benchmarks/results/vocab-parallel-cpu.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def inputs(rows: int, vocab: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(rows, vocab, generator=g) * 2
    t = torch.randn(rows, vocab, generator=g) * 2
    y = torch.randint(0, vocab, (rows,), generator=g)
    return s, t, y


def time_loss(fn, s, t, y, repeat: int, **kw) -> float:
    import kdfused

    times = []
    for i in range(repeat + 1):
        x = s.clone().requires_grad_(True)
        t0 = time.perf_counter()
        loss = kdfused.kd_loss(x, t, y, **kw)
        loss.backward()
        dt = time.perf_counter() - t0
        if i:  # the first call is a warm-up
            times.append(dt)
    return statistics.median(times)


def worker(args) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{args.port}", rank=args.rank, world_size=args.world
    )
    s, t, y = inputs(args.rows, args.vocab, args.seed)
    w = [args.vocab // args.world] * args.world
    w[-1] += args.vocab - sum(w)
    lo = sum(w[: args.rank])
    sl, tl = s[:, lo : lo + w[args.rank]].contiguous(), t[:, lo : lo + w[args.rank]].contiguous()
    kw = dict(
        temperature=2.0,
        soft_weight=0.5,
        hard_weight=0.5,
        divergence=args.divergence,
        process_group=dist.group.WORLD,
    )
    dt = time_loss(None, sl, tl, y, args.repeat, **kw)
    out = torch.tensor([dt], dtype=torch.float64)
    all_t = [torch.empty_like(out) for _ in range(args.world)]
    dist.all_gather(all_t, out)
    if args.rank == 0:
        print(json.dumps({"parallel_s": max(float(x) for x in all_t)}))
    dist.destroy_process_group()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rows", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--divergence", default="kl")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "vocab-parallel-cpu.json"))
    ap.add_argument("--rank", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.rank is not None:
        return worker(args)
    if args.seed is None:
        args.seed = int.from_bytes(os.urandom(4), "little")
    print(f"seed {args.seed} (replay with --seed {args.seed})")

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    base = [sys.executable, os.path.abspath(__file__), "--rows", str(args.rows)]
    base += ["--vocab", str(args.vocab), "--world", str(args.world), "--repeat", str(args.repeat)]
    base += ["--divergence", args.divergence, "--seed", str(args.seed), "--port", str(port)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [
        subprocess.Popen(base + ["--rank", str(r)], stdout=subprocess.PIPE, text=True, env=env)
        for r in range(args.world)
    ]
    outs = [p.communicate(timeout=1200)[0] for p in procs]
    if any(p.returncode for p in procs):
        raise SystemExit(f"a worker failed: {[p.returncode for p in procs]}")
    parallel = json.loads(outs[0].strip().splitlines()[-1])["parallel_s"]

    s, t, y = inputs(args.rows, args.vocab, args.seed)
    kw = dict(temperature=2.0, soft_weight=0.5, hard_weight=0.5, divergence=args.divergence)
    single = {}
    for threads in sorted({1, args.world}):
        torch.set_num_threads(threads)
        single[threads] = time_loss(None, s, t, y, args.repeat, **kw)
    mix = args.divergence in ("jsd", "tvd")
    sent = 9 * 4 + (3 * 4 if mix else 0)
    res = {
        "rows": args.rows,
        "vocab": args.vocab,
        "world": args.world,
        "divergence": args.divergence,
        "dtype": "float32",
        "seed": args.seed,
        "parallel_ms": parallel * 1e3,
        "single_process_ms": {str(k): v * 1e3 for k, v in single.items()},
        "bytes_sent_per_row_per_process": sent,
        "bytes_received_per_row_per_process": sent * args.world,
        "metadata_bytes_per_call_per_process": 8 * 8,
        "load_average": os.getloadavg(),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "command": "python benchmarks/vocab_parallel_bench.py " + " ".join(sys.argv[1:]),
    }
    print(
        f"{args.rows} x {args.vocab} fp32, {args.divergence}, fwd+bwd: {args.world} processes "
        f"x 1 thread (vocabulary split) {res['parallel_ms']:.1f} ms; one process "
        + ", ".join(f"{k} thread(s) {v * 1e3:.1f} ms" for k, v in single.items())
        + f"; {sent} bytes sent per row per process"
    )
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    return res


if __name__ == "__main__":
    main()
