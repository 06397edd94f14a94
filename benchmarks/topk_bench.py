"""Benchmark of kdfused.topk_kd_loss (offline distillation from a stored top-k teacher), CPU.

Forward+backward (loss and the gradient of the student logits) of:
    topk      kdfused.topk_kd_loss(s, idx, vals, temperature=T)
    eager     the code people write: log_softmax over V, gather at the k indices, the teacher's
              softmax over k, sum p (log p - log q) * T^2, batchmean; autograd for the gradient
    compile   the same function under torch.compile
    full_kd   kdfused.kd_loss(s, t) with the full N x V teacher (what storing top-k replaces;
              independent of k, measured once per (V, dtype))

    python benchmarks/topk_bench.py            # N = 2048, V in {32000, 128256}, k in {16, 64, 128},
                                               # fp32 and bf16
    python benchmarks/topk_bench.py --quick    # small sizes, a smoke run

Prints a table of medians and ratios and writes benchmarks/results/topk-cpu.{csv,json} (or
--out). Peak memory is the resident-set high-water mark above the inputs (Linux: VmHWM reset
through /proc/self/clear_refs), measured in a separate call after the timings; "-" when the OS
does not allow it.
"""

from __future__ import annotations

import argparse
import csv
import gc
import json
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import kdfused

from _procinfo import peak_rss_mib

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
T = 2.0
MIB = float(1 << 20)


def eager_topk_loss(s, idx, vals):
    log_q = F.log_softmax(s.float() / T, dim=-1).gather(-1, idx)
    log_p = F.log_softmax(vals.float() / T, dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean() * (T * T)


def kdfused_topk_loss(s, idx, vals):
    return kdfused.topk_kd_loss(s, idx, vals, temperature=T)


def kdfused_full_loss(s, t):
    return kdfused.kd_loss(s, t, temperature=T)


# ---- CPU peak memory --------------------------------------------------------------------------


def peak_mib(call):
    """RSS high-water mark of one call above the resident set before it."""
    mib = peak_rss_mib(call)
    return None if mib is None else max(0.0, mib)


# ---- timing ------------------------------------------------------------------------------------


def time_fwdbwd(loss_fn, s, args, reps, warmup):
    s = s.detach().requires_grad_()

    def call():
        s.grad = None
        loss_fn(s, *args).backward()

    for _ in range(warmup):
        call()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    s.grad = None
    mem = peak_mib(call)
    s.grad = None
    return statistics.median(times), times, mem


def make_inputs(N, V, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(N, V, generator=g) * 2).to(dtype)
    t = (torch.randn(N, V, generator=g) * 2).to(dtype)
    return s, t


def run(args):
    sizes = [(64, 2000), (64, 8000)] if args.quick else [(args.n, v) for v in args.vocab]
    ks = [4, 16] if args.quick else args.k
    reps = args.reps or (3 if args.quick else 5)
    torch.manual_seed(0)
    rows = []
    for N, V in sizes:
        for dname in args.dtypes:
            dtype = DTYPES[dname]
            s, t = make_inputs(N, V, dtype)
            # kd_loss with the full teacher does not depend on k: once per (V, dtype).
            full = (
                time_fwdbwd(kdfused_full_loss, s, (t,), reps, 1)
                if "full_kd" in args.providers
                else None
            )
            # The stored teacher: sorted top-k, so the first k of the largest k are the top k.
            idx_all, vals_all = kdfused.topk_teacher(t, max(ks))
            del t
            gc.collect()
            for k in ks:
                idx, vals = idx_all[:, :k].contiguous(), vals_all[:, :k].contiguous()
                res = {"N": N, "V": V, "k": k, "dtype": dname}
                # the fused loss against float64 eager on the first rows, before timing
                ref = eager_topk_loss(s[:64].double(), idx[:64], vals[:64].double()).item()
                got = kdfused_topk_loss(s[:64], idx[:64], vals[:64]).item()
                res["loss_rel_diff_vs_fp64_eager"] = abs(got - ref) / max(abs(ref), 1e-30)
                # A fresh compilation per case: past dynamo's recompile limit (8 shapes) the
                # compiled function would silently run eagerly.
                torch._dynamo.reset()
                compiled = torch.compile(eager_topk_loss, dynamic=False)
                for name, fn, fargs in (
                    ("topk", kdfused_topk_loss, (idx, vals)),
                    ("eager", eager_topk_loss, (idx, vals)),
                    ("compile", compiled, (idx, vals)),
                ):
                    if name not in args.providers:
                        continue
                    slow = name in ("eager", "compile")
                    med, times, mem = time_fwdbwd(
                        fn, s, fargs, max(2, reps - 2) if slow and not args.quick else reps, 1
                    )
                    res[f"{name}_ms"] = med * 1e3
                    res[f"{name}_peak_mib"] = mem
                    print(
                        f"  N={N} V={V} k={k} {dname} {name}: {med * 1e3:.1f} ms "
                        f"(peak {mem if mem is None else round(mem)} MiB)",
                        flush=True,
                    )
                if full is not None:
                    res["full_kd_ms"] = full[0] * 1e3
                    res["full_kd_peak_mib"] = full[2]
                rows.append(res)
            del s
            gc.collect()
    return rows


def fmt(x, nd=1):
    return "-" if x is None else f"{x:.{nd}f}"


def table(rows):
    head = (
        "| N x V, k, dtype | topk | eager | compile | kd_loss full teacher | compile / topk | "
        "topk / full | peak MiB topk / eager / compile / full |"
    )
    lines = [head, "|" + "---|" * 8]
    for r in rows:
        ratio_c = r.get("compile_ms") / r["topk_ms"] if r.get("compile_ms") else None
        ratio_f = r["topk_ms"] / r["full_kd_ms"] if r.get("full_kd_ms") else None
        mems = " / ".join(
            fmt(r.get(f"{p}_peak_mib"), 0) for p in ("topk", "eager", "compile", "full_kd")
        )
        lines.append(
            f"| {r['N']} x {r['V']}, k={r['k']}, {r['dtype']} | {fmt(r.get('topk_ms'))} ms | "
            f"{fmt(r.get('eager_ms'))} ms | {fmt(r.get('compile_ms'))} ms | "
            f"{fmt(r.get('full_kd_ms'))} ms | {fmt(ratio_c, 2)}x | {fmt(ratio_f, 2)}x | {mems} |"
        )
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    ap.add_argument("--n", type=int, default=2048)
    ap.add_argument("--vocab", type=int, nargs="+", default=[32000, 128256])
    ap.add_argument("--k", type=int, nargs="+", default=[16, 64, 128])
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    ap.add_argument(
        "--providers",
        nargs="+",
        default=["topk", "eager", "compile", "full_kd"],
        choices=["topk", "eager", "compile", "full_kd"],
    )
    ap.add_argument("--reps", type=int, default=0, help="timed repetitions (default 5; 3 quick)")
    ap.add_argument(
        "--out",
        default=None,
        help="output stem (default benchmarks/results/topk-cpu, or topk-cpu-quick with --quick)",
    )
    args = ap.parse_args(argv)
    here = os.path.dirname(os.path.abspath(__file__))
    stem = args.out or os.path.join(here, "results", "topk-cpu-quick" if args.quick else "topk-cpu")
    env = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "kdfused": kdfused.build_info(),
        "temperature": T,
        "command": "python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:]),
    }
    print(f"topk benchmark: {env}", flush=True)
    rows = run(args)
    print()
    print(table(rows))
    os.makedirs(os.path.dirname(stem) or ".", exist_ok=True)
    with open(stem + ".json", "w") as f:
        json.dump({"environment": env, "results": rows}, f, indent=1)
    keys = sorted(
        {k for r in rows for k in r}, key=lambda k: (k not in ("N", "V", "k", "dtype"), k)
    )
    with open(stem + ".csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    print(f"\nwrote {stem}.csv and {stem}.json")
    return rows


if __name__ == "__main__":
    main()
