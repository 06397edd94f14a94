#!/usr/bin/env python
"""kdfused benchmark: time and peak memory of the distillation loss, against what people use today.

    python benchmarks/run.py                       # quick set (< 3 min on a 2-core CPU)
    python benchmarks/run.py --set standard        # the set whose CPU results are committed
    python benchmarks/run.py --full                # every size, meant for a GPU
    python benchmarks/run.py --device cuda --out DIR
    python benchmarks/run.py --sizes 2048x32000,1024x128256:bf16 --providers kdfused,eager

Loss (every provider): 0.5 * T^2 * D(p_T || q_T) + 0.5 * cross-entropy, T = 2, batchmean, with
D = KL by default (--divergence ce|reverse_kl|jsd|tvd, --beta for jsd).
Each (case, provider) runs in a fresh subprocess on the CPU (peak RSS is per process); on CUDA one
subprocess per provider runs all sizes (peak memory from the caching allocator's statistics).
Writes ``<device>-<set>.csv`` (long format), ``.json`` (metadata + records) and ``.png`` to
``--out`` and prints a table last. See ``_worker.py`` for what exactly is timed and measured.

This file is the orchestration (arguments, one subprocess per case or provider, collecting the
results); the size sets are in ``_sizes.py``, the derived numbers, CSV and table in ``_report.py``,
the plot in ``plot.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from _report import derive, git_commit, loadavg, metadata, table, write_csv  # noqa: E402
from _sizes import SETS, memory_guard, parse_sizes  # noqa: E402


# --------------------------------------------------------------------------- arguments
def parse_args(argv=None) -> argparse.Namespace:
    import _providers as P

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument(
        "--set",
        choices=["quick", "standard", "full"],
        default="quick",
        help="size set (quick: default; on cuda quick/standard use GPU-sized cases)",
    )
    ap.add_argument(
        "--full", action="store_const", const="full", dest="set", help="same as --set full"
    )
    ap.add_argument("--sizes", help="comma list NxV[:dtype], e.g. 2048x32000,1024x32000:bf16")
    ap.add_argument(
        "--providers",
        help=f"comma list from {','.join(P.ALL_PROVIDERS)} "
        f"(default: {','.join(P.DEFAULT_PROVIDERS)}, plus Liger's on cuda)",
    )
    ap.add_argument(
        "--divergence",
        default="kl",
        choices=P.DIVERGENCES,
        help="the soft term's divergence for every provider (default kl)",
    )
    ap.add_argument("--beta", type=float, default=0.5, help="jsd's beta (default 0.5)")
    ap.add_argument("--out", default=os.path.join(HERE, "results"), help="results folder")
    ap.add_argument("--tag", help="file name stem (default: <device>-<set>)")
    ap.add_argument(
        "--target-s",
        type=float,
        default=1.0,
        help="seconds of repeated runs per timing (default 1)",
    )
    ap.add_argument("--min-reps", type=int, default=5)
    ap.add_argument("--max-reps", type=int, default=100)
    ap.add_argument("--warmup", type=int, help="untimed calls before timing (cpu 1, cuda 3)")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's, all cores)")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per case")
    ap.add_argument(
        "--isolate",
        choices=["case", "provider"],
        help="one subprocess per case x provider (cpu default) or per provider (cuda default)",
    )
    ap.add_argument(
        "--no-check", action="store_true", help="skip the loss check against kdfused.reference"
    )
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument(
        "--skip",
        default="",
        help="comma list PROVIDER@NxV[:dtype] not to run, recorded with the status "
        "--skip-reason (e.g. compile@16384x151936:bf16 when its compile time does not fit)",
    )
    ap.add_argument("--skip-reason", default="skipped")
    ap.add_argument(
        "--deadline",
        type=float,
        help="seconds for the whole run: each case's limit is cut to what is left, and cases "
        "that cannot start in time are recorded as not run (the results are still written)",
    )
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.cases = (
        parse_sizes(args.sizes)
        if args.sizes
        else SETS[args.set + "-cuda" if args.device == "cuda" and args.set != "full" else args.set]
    )
    args.set_name = "custom" if args.sizes else args.set
    args.provider_list = (
        args.providers.split(",") if args.providers else P.default_providers(args.device)
    )
    for p in args.provider_list:
        if p not in P.ALL_PROVIDERS:
            ap.error(f"unknown provider {p!r}")
    args.skip_set = set()
    for item in filter(None, (x.strip() for x in args.skip.split(","))):
        prov, _, size = item.partition("@")
        if prov not in P.ALL_PROVIDERS or not size:
            ap.error(f"--skip {item!r}: expected PROVIDER@NxV[:dtype]")
        (case,) = parse_sizes(size)
        args.skip_set.add((prov, case[1:]))
    args.warmup = args.warmup or (1 if args.device == "cpu" else 3)
    args.isolate = args.isolate or ("case" if args.device == "cpu" else "provider")
    div = "" if args.divergence == "kl" else f"-{args.divergence}"
    args.tag = args.tag or f"{args.device}-{args.set_name}{div}"
    return args


# --------------------------------------------------------------------------- subprocesses
def run_worker(specs: list[dict], timeout: float, on_result) -> None:
    """Run ``specs`` in one fresh ``run.py --worker`` process; call ``on_result(spec, res)``
    for each, including those the process never reported (crash, timeout)."""
    with tempfile.TemporaryFile(mode="w+") as err:
        proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(specs)],
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            cwd=HERE,
        )
        lines: queue.Queue = queue.Queue()
        threading.Thread(
            target=lambda: [lines.put(x) for x in proc.stdout] + [lines.put(None)], daemon=True
        ).start()
        deadline = time.monotonic() + timeout * len(specs)
        done, why = 0, None
        while done < len(specs):
            try:
                line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                proc.kill()
                why = f"timeout (> {timeout:.0f} s per case)"
                break
            if line is None:
                break
            if line.startswith("@@RESULT "):
                on_result(specs[done], json.loads(line[len("@@RESULT ") :]))
                done += 1
        rc = proc.wait()
        if done < len(specs):
            err.seek(0)
            tail = [x for x in err.read().splitlines() if x.strip()][-1:] or [""]
            if why is None:
                why = (
                    "killed (signal 9: out of memory?)"
                    if rc == -9
                    else f"crashed (exit code {rc}): {tail[0][:160]}"
                )
            for spec in specs[done:]:
                on_result(
                    spec,
                    {
                        **{k: spec[k] for k in ("case", "label", "N", "V", "dtype", "provider")},
                        "status": why,
                    },
                )


# --------------------------------------------------------------------------- main
def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        import _worker

        _worker.main(json.loads(args.worker))
        return 0

    from tqdm import tqdm

    load_before = loadavg()
    # the tree measured is the one at the start (files edited during a run do not count)
    commit = git_commit()
    if load_before and load_before > 0.5 * (os.cpu_count() or 1) and args.device == "cpu":
        print(
            f"warning: load average {load_before:.1f} on {os.cpu_count()} cores; CPU timings "
            "will be noisy (multi-threaded ops stall when their threads are descheduled)",
            file=sys.stderr,
        )
    common = dict(
        device=args.device,
        divergence=args.divergence,
        beta=args.beta,
        threads=args.threads,
        warmup=args.warmup,
        target_s=args.target_s,
        min_reps=args.min_reps,
        max_reps=args.max_reps,
        check=not args.no_check,
    )
    records, skipped, env = [], [], {}
    specs = []
    for i, case in enumerate(args.cases):
        label, n, v, dtype = case
        for p in args.provider_list:
            spec = dict(common, case=i, label=label, N=n, V=v, dtype=dtype, provider=p)
            reason = memory_guard(case, args.device)
            if (p, case[1:]) in args.skip_set:
                reason = args.skip_reason
            if reason:
                skipped.append(
                    {
                        **{k: spec[k] for k in ("case", "label", "N", "V", "dtype", "provider")},
                        "status": reason,
                    }
                )
            else:
                specs.append(spec)
    if args.isolate == "case":
        groups = [[s] for s in specs]
    else:
        groups = [[s for s in specs if s["provider"] == p] for p in args.provider_list]
        groups = [g for g in groups if g]

    t0 = time.monotonic()
    bar = tqdm(total=len(specs) + 1, desc="kdfused bench", unit="run", dynamic_ncols=True)
    bar.set_postfix_str("copy bandwidth")

    copy_spec = [dict(common, case=-1, label="copy", N=0, V=0, dtype="fp32", provider="_copy")]
    copies = []

    def on_env(spec, res):
        env.update(res)
        copies.append(res.get("copy_gbps"))
        bar.update(1)

    run_worker(copy_spec, args.timeout, on_env)

    def on_result(spec, res):
        records.append(res)
        bar.update(1)

    end = t0 + args.deadline if args.deadline else float("inf")
    for group in groups:
        first = group[0]
        bar.set_postfix_str(
            f"{first['provider']} {first['N']}x{first['V']} {first['dtype']}"
            + (f" (+{len(group) - 1} sizes)" if len(group) > 1 else "")
        )
        left = end - time.monotonic() - 20  # kept for the copy run and the files
        if left < 5:
            for spec in group:
                keys = ("case", "label", "N", "V", "dtype", "provider")
                records.append({**{k: spec[k] for k in keys}, "status": "not run: out of time"})
            continue
        run_worker(group, min(args.timeout, left / len(group)), on_result)
    bar.update(-1)  # the copy bandwidth again at the end; the better of the two is the reference
    if end - time.monotonic() > 15:
        run_worker(copy_spec, min(args.timeout, end - time.monotonic() - 5), on_env)
    bar.close()
    env["copy_gbps_runs"] = copies
    if any(copies):
        env["copy_gbps"] = max(c for c in copies if c)
    order = {p: i for i, p in enumerate(args.provider_list)}
    records = sorted(records + skipped, key=lambda r: (r["case"], order[r["provider"]]))
    if "copy_gbps" not in env:
        print(f"copy-bandwidth worker failed: {env.get('status')}", file=sys.stderr)
    derive(records, env.get("copy_gbps"))
    meta = metadata(args, env)
    meta["git_commit"] = commit
    meta["wall_s"] = round(time.monotonic() - t0, 1)
    meta["loadavg_1min"] = {"start": load_before, "end": loadavg()}

    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, args.tag)
    with open(stem + ".json", "w") as f:
        json.dump({"meta": meta, "results": records}, f, indent=1)
    write_csv(stem + ".csv", records, meta)
    written = [stem + ".csv", stem + ".json"]
    if not args.no_plot:
        try:
            import plot

            plot.plot(records, meta, stem + ".png")
            written.append(stem + ".png")
        except Exception as exc:  # noqa: BLE001 - a plotting problem must not lose the results
            print(f"plot failed: {exc}", file=sys.stderr)
    print()
    print(table(records, meta))
    print(
        f"\n{len(records)} runs in {meta['wall_s']:.0f} s; wrote "
        + ", ".join(os.path.relpath(p) for p in written)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
