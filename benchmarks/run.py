#!/usr/bin/env python
"""kdfused benchmark: time and peak memory of the distillation loss, against what people use today.

    python benchmarks/run.py                       # quick set (< 3 min on a 2-core CPU)
    python benchmarks/run.py --set standard        # the set whose CPU results are committed
    python benchmarks/run.py --full                # every size of the issue (meant for a GPU)
    python benchmarks/run.py --device cuda --out DIR
    python benchmarks/run.py --sizes 2048x32000,1024x128256:bf16 --providers kdfused,eager

Loss (every provider): 0.5 * T^2 * KL(p_T || q_T) + 0.5 * cross-entropy, T = 2, batchmean.
Each (case, provider) runs in a fresh subprocess on the CPU (peak RSS is per process); on CUDA one
subprocess per provider runs all sizes (peak memory from the caching allocator's statistics).
Writes ``<device>-<set>.csv`` (long format), ``.json`` (metadata + records) and ``.png`` to
``--out`` and prints a table last. See ``_worker.py`` for what exactly is timed and measured.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import queue
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

ELEMENT_SIZE = {"fp32": 4, "bf16": 2, "fp16": 2}
LM_VOCABS = (32000, 128256, 151936, 256000)
CORE = ("core", 2048, 32000, "fp32")  # the performance case: CPU fwd+bwd, T=2, 0.5/0.5

# (label, N, V, dtype). "core" is the headline case; "classifier" V <= 1000; "lm" large V.
SETS = {
    "quick": [("classifier", 4096, 1000, "fp32"), CORE, ("lm", 1024, 32000, "bf16")],
    "quick-cuda": [("classifier", 4096, 1000, "fp32"), CORE, ("lm", 8192, 128256, "bf16"),
                   ("lm", 16384, 151936, "bf16")],
    "standard": (
        [("classifier", 256, 1000, "fp32")]
        + [("classifier", 4096, v, "fp32") for v in (10, 100, 1000)]
        + [CORE]
        + [("lm", 512, v, d) for d in ("fp32", "bf16") for v in LM_VOCABS]
    ),
    "standard-cuda": (
        [("classifier", 4096, v, "fp32") for v in (10, 100, 1000)]
        + [CORE]
        + [("lm", 8192, v, d) for d in ("fp32", "bf16") for v in LM_VOCABS]
    ),
    "full": (
        [("classifier", n, v, "fp32") for n in (256, 1024, 4096) for v in (10, 100, 1000)]
        + [CORE]
        + [("lm", n, v, d) for d in ("fp32", "bf16") for n in (1024, 4096, 8192, 32768)
           for v in LM_VOCABS]
    ),
}


# --------------------------------------------------------------------------- arguments
def parse_sizes(text: str) -> list[tuple]:
    """``"2048x32000,1024x128256:bf16"`` -> cases (dtype defaults to fp32)."""
    cases = []
    for item in filter(None, (x.strip() for x in text.split(","))):
        shape, _, dtype = item.partition(":")
        n, v = (int(x) for x in shape.lower().split("x"))
        dtype = dtype or "fp32"
        if dtype not in ELEMENT_SIZE:
            raise SystemExit(f"unknown dtype {dtype!r} in --sizes; use fp32, bf16 or fp16")
        label = "core" if (n, v, dtype) == CORE[1:] else ("classifier" if v <= 1000 else "lm")
        cases.append((label, n, v, dtype))
    return cases


def parse_args(argv=None) -> argparse.Namespace:
    import _providers as P

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--set", choices=["quick", "standard", "full"], default="quick",
                    help="size set (quick: default; on cuda quick/standard use GPU-sized cases)")
    ap.add_argument("--full", action="store_const", const="full", dest="set",
                    help="same as --set full")
    ap.add_argument("--sizes", help="comma list NxV[:dtype], e.g. 2048x32000,1024x32000:bf16")
    ap.add_argument("--providers", help=f"comma list from {','.join(P.ALL_PROVIDERS)} "
                    f"(default: {','.join(P.DEFAULT_PROVIDERS)}, plus Liger's on cuda)")
    ap.add_argument("--out", default=os.path.join(HERE, "results"), help="results folder")
    ap.add_argument("--tag", help="file name stem (default: <device>-<set>)")
    ap.add_argument("--target-s", type=float, default=1.0,
                    help="seconds of repeated runs per timing (default 1)")
    ap.add_argument("--min-reps", type=int, default=5)
    ap.add_argument("--max-reps", type=int, default=100)
    ap.add_argument("--warmup", type=int, help="untimed calls before timing (cpu 1, cuda 3)")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's, all cores)")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per case")
    ap.add_argument("--isolate", choices=["case", "provider"],
                    help="one subprocess per case x provider (cpu default) or per provider "
                    "(cuda default)")
    ap.add_argument("--no-check", action="store_true",
                    help="skip the loss check against kdfused.reference")
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.cases = parse_sizes(args.sizes) if args.sizes else SETS[
        args.set + "-cuda" if args.device == "cuda" and args.set != "full" else args.set]
    args.set_name = "custom" if args.sizes else args.set
    args.provider_list = (args.providers.split(",") if args.providers
                          else P.default_providers(args.device))
    for p in args.provider_list:
        if p not in P.ALL_PROVIDERS:
            ap.error(f"unknown provider {p!r}")
    args.warmup = args.warmup or (1 if args.device == "cpu" else 3)
    args.isolate = args.isolate or ("case" if args.device == "cpu" else "provider")
    args.tag = args.tag or f"{args.device}-{args.set_name}"
    return args


# --------------------------------------------------------------------------- subprocesses
def run_worker(specs: list[dict], timeout: float, on_result) -> None:
    """Run ``specs`` in one fresh ``run.py --worker`` process; call ``on_result(spec, res)``
    for each, including those the process never reported (crash, timeout)."""
    with tempfile.TemporaryFile(mode="w+") as err:
        proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(specs)],
            stdout=subprocess.PIPE, stderr=err, text=True, cwd=HERE,
        )
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout] + [lines.put(None)],
                         daemon=True).start()
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
                on_result(specs[done], json.loads(line[len("@@RESULT "):]))
                done += 1
        rc = proc.wait()
        if done < len(specs):
            err.seek(0)
            tail = [x for x in err.read().splitlines() if x.strip()][-1:] or [""]
            if why is None:
                why = ("killed (signal 9: out of memory?)" if rc == -9
                       else f"crashed (exit code {rc}): {tail[0][:160]}")
            for spec in specs[done:]:
                on_result(spec, {**{k: spec[k] for k in ("case", "label", "N", "V", "dtype",
                                                         "provider")}, "status": why})


def memory_guard(case: tuple, device: str) -> str | None:
    """A reason to skip a CPU case whose inputs + gradient cannot fit in memory at all."""
    if device != "cpu":
        return None
    _, n, v, dtype = case
    need = 3 * n * v * ELEMENT_SIZE[dtype]
    try:
        with open("/proc/meminfo") as f:
            avail = next(int(x.split()[1]) * 1024 for x in f if x.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return None
    if need > 0.9 * avail:
        return f"skipped: inputs + gradient need {need / 2**30:.1f} GiB, " \
               f"{avail / 2**30:.1f} GiB available"
    return None


# --------------------------------------------------------------------------- metadata, derived
def git_commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=HERE, capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=HERE, capture_output=True, text=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _loadavg() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return None


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def derive(records: list[dict], copy_gbps: float | None) -> None:
    """Add speed-ups (vs eager, vs compile; fwd+bwd and fwd) and achieved bandwidth fractions."""
    by_case: dict = {}
    for r in records:
        by_case.setdefault(r["case"], {})[r["provider"]] = r
    for case in by_case.values():
        for r in case.values():
            if r["status"] != "ok" and not r["status"].startswith("mismatch"):
                continue
            nbytes = r["N"] * r["V"] * ELEMENT_SIZE[r["dtype"]]
            for kind, moved in (("fwd", 2 * nbytes), ("fwdbwd", 3 * nbytes)):
                ms = r[kind]["median_ms"]
                r[f"{kind}_gbps"] = moved / (ms / 1e3) / 1e9
                if copy_gbps:
                    r[f"{kind}_bw_frac"] = r[f"{kind}_gbps"] / copy_gbps
                for base in ("eager", "compile"):
                    b = case.get(base)
                    if b and kind in b:
                        r[f"{kind}_speedup_vs_{base}"] = b[kind]["median_ms"] / ms
            r["grad_mib"] = nbytes / 2**20  # the fwd+bwd memory floor: the gradient itself


# --------------------------------------------------------------------------- output
METRICS = [  # (csv metric, record key, sub-key or None, unit)
    ("fwd_time", "fwd", "median_ms", "ms"),
    ("fwdbwd_time", "fwdbwd", "median_ms", "ms"),
    ("fwd_peak_mem", "fwd_peak_mib", None, "MiB"),
    ("fwdbwd_peak_mem", "fwdbwd_peak_mib", None, "MiB"),
    ("fwdbwd_speedup_vs_eager", "fwdbwd_speedup_vs_eager", None, "x"),
    ("fwdbwd_speedup_vs_compile", "fwdbwd_speedup_vs_compile", None, "x"),
    ("fwd_speedup_vs_eager", "fwd_speedup_vs_eager", None, "x"),
    ("fwd_speedup_vs_compile", "fwd_speedup_vs_compile", None, "x"),
    ("fwd_bw_frac", "fwd_bw_frac", None, "fraction of copy bandwidth"),
    ("fwdbwd_bw_frac", "fwdbwd_bw_frac", None, "fraction of copy bandwidth"),
    ("first_call", "fwdbwd", "first_call_s", "s"),
    ("loss_rel_err", "rel_err", None, "relative"),
]


def write_csv(path: str, records: list[dict], meta: dict) -> None:
    """Long format: one row per case x provider x metric (one 'status' row for failures)."""
    cols = ["device", "set", "case", "label", "N", "V", "dtype", "provider", "status", "metric",
            "value", "p20", "p80", "reps", "unit"]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for r in records:
            base = {"device": meta["device"], "set": meta["set"], **{k: r[k] for k in cols[2:9]}}
            rows = 0
            for metric, key, sub, unit in METRICS:
                val = r.get(key)
                if isinstance(val, dict):
                    extra = {"p20": val.get("p20_ms"), "p80": val.get("p80_ms"),
                             "reps": val.get("reps")} if sub == "median_ms" else {}
                    val = val.get(sub)
                else:
                    extra = {}
                if val is None:
                    continue
                w.writerow({**base, "metric": metric, "value": f"{val:.6g}", "unit": unit,
                            **{k: f"{v:.6g}" if isinstance(v, float) else v
                               for k, v in extra.items()}})
                rows += 1
            if rows == 0:
                w.writerow({**base, "metric": "status"})


def _fmt(x, spec=".1f", none="-"):
    return none if x is None else format(x, spec)


def table(records: list[dict], meta: dict) -> str:
    """The human-readable summary printed at the end of a run."""
    head = ["case", "provider", "fwd ms", "fwd+bwd ms [p20-p80]", "vs eager", "vs compile",
            "peak MiB", "floor MiB", "% copy BW", "status"]
    rows = []
    for r in records:
        ok = "fwdbwd" in r
        fb = r.get("fwdbwd", {})
        rows.append([
            f"{r['label']} {r['N']}x{r['V']} {r['dtype']}",
            r["provider"],
            _fmt(r.get("fwd", {}).get("median_ms")),
            f"{fb['median_ms']:.1f} [{fb['p20_ms']:.1f}-{fb['p80_ms']:.1f}]" if ok else "-",
            _fmt(r.get("fwdbwd_speedup_vs_eager"), ".2f") + ("x" if ok else ""),
            _fmt(r.get("fwdbwd_speedup_vs_compile"), ".2f") + ("x" if ok else ""),
            _fmt(r.get("fwdbwd_peak_mib"), ".0f"),
            _fmt(r.get("grad_mib"), ".0f"),
            _fmt(r["fwdbwd_bw_frac"] * 100 if "fwdbwd_bw_frac" in r else None, ".1f"),
            r["status"],
        ])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()
    out = [line(head), line(["-" * w for w in widths])]
    prev = None
    for row in rows:
        if prev is not None and row[0] != prev:
            out.append("")
        out.append(line(row if row[0] != prev else [""] + row[1:]))
        prev = row[0]
    copy = meta.get("copy_gbps")
    notes = [
        f"{meta['device_name']} | {meta['threads']} threads | torch {meta['torch']}"
        f"{' | CUDA ' + meta['cuda'] if meta['device'] == 'cuda' else ''} | "
        f"copy bandwidth {_fmt(copy)} GB/s | load avg {meta['loadavg_1min']['start']} | "
        f"commit {meta['git_commit'][:12]}",
        "loss: 0.5*T^2*KL(p_T||q_T) + 0.5*CE, T=2, batchmean. fwd = loss under no_grad; "
        "fwd+bwd = loss + backward (grad of the student logits); times are medians.",
        "vs eager / vs compile: fwd+bwd speed-up over the eager / torch.compile'd PyTorch code. "
        "peak MiB: fwd+bwd peak memory above the inputs",
        f"  ({meta['memory_method']}); floor MiB = the gradient itself. "
        "% copy BW: (read s, t + write grad) bytes / time, vs measured copy bandwidth.",
    ]
    return "\n".join(out + [""] + notes)


def metadata(args, env: dict) -> dict:
    return {
        "device": args.device,
        "device_name": env.get("device_name") or cpu_model(),
        "machine": platform.machine(),
        "processor": cpu_model(),
        "cpu_count": os.cpu_count(),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "torch": env.get("torch"),
        "cuda": env.get("cuda"),
        "kdfused": env.get("kdfused"),
        "threads": env.get("threads"),
        "memory_method": env.get("memory_method"),
        "copy_gbps": env.get("copy_gbps"),
        "copy_gbps_runs": env.get("copy_gbps_runs"),  # measured at the start and at the end
        "git_commit": git_commit(),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "set": args.set_name,
        "providers": args.provider_list,
        "loss": {"temperature": 2.0, "soft_weight": 0.5, "hard_weight": 0.5,
                 "divergence": "kl", "reduction": "batchmean"},
        "timing": {"warmup": args.warmup, "target_s": args.target_s, "min_reps": args.min_reps,
                   "max_reps": args.max_reps,
                   "clock": "CUDA events" if args.device == "cuda" else "time.perf_counter"},
        "isolate": args.isolate,
        "command": "python benchmarks/run.py " + " ".join(sys.argv[1:]),
    }


# --------------------------------------------------------------------------- main
def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        import _worker

        _worker.main(json.loads(args.worker))
        return 0

    from tqdm import tqdm

    load_before = _loadavg()
    if load_before and load_before > 0.5 * (os.cpu_count() or 1) and args.device == "cpu":
        print(f"warning: load average {load_before:.1f} on {os.cpu_count()} cores; CPU timings "
              "will be noisy (multi-threaded ops stall when their threads are descheduled)",
              file=sys.stderr)
    common = dict(device=args.device, threads=args.threads, warmup=args.warmup,
                  target_s=args.target_s, min_reps=args.min_reps, max_reps=args.max_reps,
                  check=not args.no_check)
    records, skipped, env = [], [], {}
    specs = []
    for i, case in enumerate(args.cases):
        label, n, v, dtype = case
        for p in args.provider_list:
            spec = dict(common, case=i, label=label, N=n, V=v, dtype=dtype, provider=p)
            reason = memory_guard(case, args.device)
            if reason:
                skipped.append({**{k: spec[k] for k in ("case", "label", "N", "V", "dtype",
                                                        "provider")}, "status": reason})
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

    for group in groups:
        first = group[0]
        bar.set_postfix_str(f"{first['provider']} {first['N']}x{first['V']} {first['dtype']}"
                            + (f" (+{len(group) - 1} sizes)" if len(group) > 1 else ""))
        run_worker(group, args.timeout, on_result)
    bar.update(-1)  # the copy bandwidth again at the end; the better of the two is the reference
    run_worker(copy_spec, args.timeout, on_env)
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
    meta["wall_s"] = round(time.monotonic() - t0, 1)
    meta["loadavg_1min"] = {"start": load_before, "end": _loadavg()}

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
    print(f"\n{len(records)} runs in {meta['wall_s']:.0f} s; wrote "
          + ", ".join(os.path.relpath(p) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
