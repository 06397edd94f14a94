#!/usr/bin/env python
"""summary.md of benchmarks/gpu_check.sh: one screen, a verdict per step, the failing tests by
name, the benchmark tables. Written after every step (a later crash leaves the verdicts so far).

    gpu_summary.write(outdir, workdir, mode, steps, budget, elapsed, note) -> exit status

A step's status: "ok", "n/a" (a tool or device this machine does not have: neither a pass nor a
failure), "inconclusive" (e.g. a sanitizer run cut by its deadline with no error reported),
"FAILED ...", "timed out", "not run" (a step it needs failed, or the budget was spent), "pending"
(not reached yet). Exit status: 1 when a step FAILED, timed out or was not run; else 0.
"""

from __future__ import annotations

import json
import os
import re

GOOD = ("ok", "n/a", "inconclusive", "pending")
MAX_FAILS = 40


def lines(path, n=None):
    try:
        with open(path, errors="replace") as f:
            out = f.read().splitlines()
    except OSError:
        return []
    return out if n is None else out[-n:]


def env_facts(work):
    env = lines(os.path.join(work, "env.txt"))
    get = lambda key: next((x[len(key) :].strip() for x in env if x.startswith(key)), "?")  # noqa: E731
    return get("device "), get("git: "), get("torch ")


def failing_tests(work):
    """'node id -- first error line' of every failing test in the pytest report."""
    txt = lines(os.path.join(work, "pytest.txt"))
    return [x[2:] for x in txt if x.startswith(("F ", "E "))]


def bench_table(work):
    try:
        with open(os.path.join(work, "bench", "bench.json")) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return []
    meta, recs = data.get("meta", {}), data.get("results", [])
    provs = []
    for r in recs:
        if r["provider"] not in provs:
            provs.append(r["provider"])
    rows = [
        "",
        f"Benchmark ({meta.get('device_name', '?')}, copy bandwidth "
        f"{meta.get('copy_gbps') or 0:.0f} GB/s), forward+backward median ms:",
        "",
        "| case | " + " | ".join(provs) + " | kdfused vs compile | % copy BW |",
        "|---|" + "---:|" * (len(provs) + 2),
    ]
    cases = {}
    for r in recs:
        key = (r["case"], f"{r['label']} {r['N']}x{r['V']} {r['dtype']}")
        cases.setdefault(key, {})[r["provider"]] = r

    def ms(r):
        if r is None:
            return "-"
        if "fwdbwd" in r:
            return f"{r['fwdbwd']['median_ms']:.2f}"
        return str(r.get("status", "?"))[:24]

    for (_, label), by in sorted(cases.items()):
        k = by.get("kdfused", {})
        vs = f"{k['fwdbwd_speedup_vs_compile']:.2f}x" if "fwdbwd_speedup_vs_compile" in k else "-"
        bw = f"{100 * k['fwdbwd_bw_frac']:.0f}%" if "fwdbwd_bw_frac" in k else "-"
        rows.append(
            f"| {label} | " + " | ".join(ms(by.get(p)) for p in provs) + f" | {vs} | {bw} |"
        )
    return rows


def linear_table(work, mode):
    """The fused linear benchmark (benchmarks/linear_bench.py), a row per provider."""
    try:
        with open(os.path.join(work, "bench", "linear.json")) as f:
            rows = json.load(f)["rows"]
    except (OSError, ValueError, KeyError):
        return []
    if not rows:
        return []
    r0 = rows[0]
    device = next((r["device_name"] for r in rows if "device_name" in r), r0.get("device", "?"))
    head = (
        f"Fused linear + loss ({device}, N,H,V = {r0['N']},{r0['H']},{r0['V']} {r0['dtype']}, "
        "TRL's soft JSD), forward+backward median ms, peak MiB above the inputs:"
    )
    if mode != "gpu":
        head += " (rehearsal: a tiny CPU case, the numbers mean nothing)"
    md = ["", head, "", "| provider | ms | peak MiB | loss |", "|---|---:|---:|---:|"]
    for r in rows:
        if "ms" in r:
            ms, mib, loss = f"{r['ms']:.2f}", f"{r['peak_mib']:.0f}", f"{r['loss']:.7g}"
            md.append(f"| {r['provider']} | {ms} | {mib} | {loss} |")
        else:
            why = " ".join([r.get("status", "error"), *r.get("error", [])])
            why = re.sub(r"\s+", " ", why).replace("|", "/")[:80]
            md.append(f"| {r['provider']} | {why} | - | - |")
    losses = [r["loss"] for r in rows if "ms" in r]
    if len(losses) > 1:
        spread = (max(losses) - min(losses)) / max(max(abs(x) for x in losses), 1e-30)
        md += ["", f"The {len(losses)} losses agree to {spread:.1e} (relative)."]
    return md


def write(out, work, mode, steps, budget, elapsed, note="") -> int:
    bad = [s.name for s in steps if not s.status.startswith(GOOD)]
    device, commit, torch_v = env_facts(work)
    pending = any(s.status == "pending" for s in steps)
    if mode == "gpu":
        head = "PASS: every step passed" if not bad else f"FAIL: {', '.join(bad)}"
    else:
        head = (
            "REHEARSAL PASSED (no GPU work was done)"
            if not bad
            else f"REHEARSAL FAILED: {', '.join(bad)}"
        )
    if pending:
        head += " (so far: the check is still running or was stopped)"
    md = [
        f"# kdfused GPU check: {head}",
        "",
        f"mode: {mode} | device: {device} | torch {torch_v} | commit {commit} | "
        f"{elapsed:.0f} s of a {budget} s budget",
    ]
    if note:
        md += ["", f"**{note}**"]
    md += ["", "| step | result | s used / box | details |", "|---|---|---:|---|"]
    for s in steps:
        used = f"{s.seconds:.0f} / {s.given}" if s.given else "-"
        detail = re.sub(r"\s+", " ", s.detail).replace("|", "/")[:400]
        md.append(f"| {s.name} | {s.status} | {used} | {detail} |")
    fails = failing_tests(work)
    if fails:
        md += ["", f"Failing tests ({len(fails)}; node id -- first error line):", ""]
        md += [f"- {x}" for x in fails[:MAX_FAILS]]
        if len(fails) > MAX_FAILS:
            md.append(f"- ... and {len(fails) - MAX_FAILS} more (pytest.txt)")
    if mode == "gpu":
        md += bench_table(work)
    md += linear_table(work, mode)
    md += [
        "",
        "Steps: " + "; ".join(f"{s.name}: {s.what}" for s in steps) + ".",
        "",
        "Files: summary.md, selftest.txt, pytest.txt, sanitizer.txt, runtime.txt (nccl, streams, "
        "CUDA graphs), bench.csv, bench.json, linear.csv, linear.json (the fused linear "
        "benchmark), logs.tar.gz (every step's report and full log).",
    ]
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    return 1 if bad else 0
