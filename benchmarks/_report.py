"""The benchmark's results: run metadata, derived numbers (speed-ups, bandwidth fractions), the
long-format CSV and the table printed at the end of a run."""

from __future__ import annotations

import csv
import datetime
import os
import platform
import subprocess
import sys

from _procinfo import cpu_model
from _procinfo import loadavg as loadavgs
from _sizes import ELEMENT_SIZE

HERE = os.path.dirname(os.path.abspath(__file__))


def git_commit() -> str:
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=HERE, capture_output=True, text=True, check=True
        ).stdout.strip()
        # Changed result files (this and earlier runs write them) do not make the code measured
        # dirty; any other tracked change does.
        dirty = subprocess.run(
            [
                "git",
                "status",
                "--porcelain",
                "--untracked-files=no",
                "--",
                ":(top)",
                ":(top,exclude)benchmarks/results",
                ":(top,exclude)examples/results",
            ],
            cwd=HERE,
            capture_output=True,
            text=True,
        ).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def loadavg() -> float | None:
    """The 1-minute load average, or None."""
    avgs = loadavgs()
    return avgs[0] if avgs else None


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
    cols = [
        "device",
        "set",
        "case",
        "label",
        "N",
        "V",
        "dtype",
        "provider",
        "status",
        "metric",
        "value",
        "p20",
        "p80",
        "reps",
        "unit",
    ]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for r in records:
            base = {"device": meta["device"], "set": meta["set"], **{k: r[k] for k in cols[2:9]}}
            rows = 0
            for metric, key, sub, unit in METRICS:
                val = r.get(key)
                if isinstance(val, dict):
                    extra = (
                        {
                            "p20": val.get("p20_ms"),
                            "p80": val.get("p80_ms"),
                            "reps": val.get("reps"),
                        }
                        if sub == "median_ms"
                        else {}
                    )
                    val = val.get(sub)
                else:
                    extra = {}
                if val is None:
                    continue
                w.writerow(
                    {
                        **base,
                        "metric": metric,
                        "value": f"{val:.6g}",
                        "unit": unit,
                        **{k: f"{v:.6g}" if isinstance(v, float) else v for k, v in extra.items()},
                    }
                )
                rows += 1
            if rows == 0:
                w.writerow({**base, "metric": "status"})


def _fmt(x, spec=".1f", none="-"):
    return none if x is None else format(x, spec)


def table(records: list[dict], meta: dict) -> str:
    """The human-readable summary printed at the end of a run."""
    head = [
        "case",
        "provider",
        "fwd ms",
        "fwd+bwd ms [p20-p80]",
        "vs eager",
        "vs compile",
        "peak MiB",
        "floor MiB",
        "% copy BW",
        "status",
    ]
    rows = []
    for r in records:
        ok = "fwdbwd" in r
        fb = r.get("fwdbwd", {})
        rows.append(
            [
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
            ]
        )
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
    loss = meta.get("loss", {})
    div = {
        "kl": "KL(p_T||q_T)",
        "ce": "CE(p_T, q_T)",
        "reverse_kl": "KL(q_T||p_T)",
        "tvd": "TVD(p_T, q_T)",
    }.get(loss.get("divergence", "kl"), f"JSD_beta={loss.get('beta')}(p_T, q_T)")
    notes = [
        f"{meta['device_name']} | {meta['threads']} threads | torch {meta['torch']}"
        f"{' | CUDA ' + meta['cuda'] if meta['device'] == 'cuda' else ''} | "
        f"copy bandwidth {_fmt(copy)} GB/s | load avg {meta['loadavg_1min']['start']} | "
        f"commit {meta['git_commit'][:12]}",
        f"loss: 0.5*T^2*{div} + 0.5*CE, T=2, batchmean. fwd = loss under no_grad; "
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
        "loss": {
            "temperature": 2.0,
            "soft_weight": 0.5,
            "hard_weight": 0.5,
            "divergence": args.divergence,
            "beta": args.beta,
            "reduction": "batchmean",
        },
        "timing": {
            "warmup": args.warmup,
            "target_s": args.target_s,
            "min_reps": args.min_reps,
            "max_reps": args.max_reps,
            "clock": "CUDA events" if args.device == "cuda" else "time.perf_counter",
        },
        "isolate": args.isolate,
        "command": "python benchmarks/run.py " + " ".join(sys.argv[1:]),
    }
