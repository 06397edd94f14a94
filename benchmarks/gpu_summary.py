#!/usr/bin/env python
"""summary.md of benchmarks/gpu_check.sh: one screen, a verdict per step; prints it; its exit
status is the check's (0 every step passed, 1 something failed, 3 no GPU present and the
pre-flight checks passed).

    python benchmarks/gpu_summary.py WORKDIR OUTDIR gpu|nogpu

WORKDIR holds steps.tsv (name, exit code or "skip:REASON", seconds, time box) and the step logs;
OUTDIR the result files (selftest.txt, pytest.txt, sanitizer.txt, bench.json, ...).
"""

from __future__ import annotations

import json
import os
import re
import sys

NA_CODE = 3  # a step's "not applicable here" exit code (tool unavailable, no GPU)
WHAT = {
    "env": "machine, GPU, torch, nvcc, packages",
    "files": "the check's scripts exist and compile",
    "wheels": "offline wheels (wheels/) installed",
    "build": "build the extension in place",
    "import": "the fresh build imports",
    "selftest": "python -m kdfused.selftest (every compiled path vs float64)",
    "pytest": "pytest of the CUDA tests",
    "sanitizer": "compute-sanitizer memcheck / racecheck / synccheck",
    "bench": "benchmark sweep (benchmarks/run.py)",
}


def lines(path, n=None):
    try:
        with open(path, errors="replace") as f:
            out = f.read().splitlines()
    except OSError:
        return []
    return out if n is None else out[-n:]


def last_match(seq, pattern):
    rx = re.compile(pattern)
    return next((x.strip() for x in reversed(seq) if rx.search(x)), "")


def detail(name, work, out, mode):
    log = lines(os.path.join(work, f"{name}.log"))
    if name == "env":
        keep = ("device", "torch ", "nvcc ", "compute-sanitizer ")
        return "; ".join(x for x in log if x.startswith(keep)) or "(no env log)"
    if name == "build":
        err = next((x.strip() for x in log if re.search(r"\berror\b", x, re.I)), "")
        head = next((x for x in log if x.startswith("kdfused: building")), "")
        return (err[:150] if err else head[9:].strip()) or (log[-1][:150] if log else "")
    if name == "import":
        return log[-1][:160] if log else ""
    if name == "selftest":
        txt = lines(os.path.join(out, "selftest.txt"))
        fails = sum(x.startswith("FAIL ") for x in txt)
        res = last_match(txt, r"kdfused self-test (PASSED|FAILED)|nothing to test")
        return res + (f" ({fails} FAIL lines in selftest.txt)" if fails else "")
    if name == "pytest":
        txt = lines(os.path.join(out, "pytest.txt"))
        return last_match(txt, r"^CUDA tests|^collected|not installed")
    if name == "sanitizer":
        txt = lines(os.path.join(out, "sanitizer.txt"))
        got = [
            x.strip()
            for x in txt
            if re.match(
                r"(memcheck|racecheck|synccheck|tool unavail"
                r"|no GPU|compute-sanitizer: tool)",
                x,
            )
        ]
        return "; ".join(got)
    if name == "bench":
        done = last_match(log, r"runs in .* s; wrote").split(";")[0]
        what = "tiny CPU run of the benchmark pipeline: " if mode == "nogpu" else ""
        return what + (done or (log[-1][:150] if log else ""))
    return log[-1][:150] if log else ""


def bench_table(out):
    try:
        with open(os.path.join(out, "bench.json")) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return []
    meta, recs = data.get("meta", {}), data.get("results", [])
    rows = [
        "",
        f"Benchmark ({meta.get('device_name', '?')}, copy bandwidth "
        f"{meta.get('copy_gbps') or 0:.0f} GB/s), fwd+bwd median ms:",
        "",
        "| case | kdfused | eager | compile | liger_kl | vs eager | vs compile | % copy BW |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    cases = {}
    for r in recs:
        cases.setdefault((r["case"], f"{r['label']} {r['N']}x{r['V']} {r['dtype']}"), {})[
            r["provider"]
        ] = r

    def ms(r):
        if r is None:
            return "-"
        return f"{r['fwdbwd']['median_ms']:.2f}" if "fwdbwd" in r else r.get("status", "?")[:18]

    for (_, label), by in sorted(cases.items()):
        k = by.get("kdfused", {})
        f = lambda key, fmt, k=k: format(k[key], fmt) + "x" if key in k else "-"  # noqa: E731
        bw = f"{100 * k['fwdbwd_bw_frac']:.0f}%" if "fwdbwd_bw_frac" in k else "-"
        rows.append(
            f"| {label} | {ms(by.get('kdfused'))} | {ms(by.get('eager'))} | "
            f"{ms(by.get('compile'))} | {ms(by.get('liger_kl'))} | "
            f"{f('fwdbwd_speedup_vs_eager', '.2f')} | "
            f"{f('fwdbwd_speedup_vs_compile', '.2f')} | {bw} |"
        )
    return rows


def main(argv) -> int:
    work, out, mode = argv[1], argv[2], argv[3]
    steps = [x.split("\t") for x in lines(os.path.join(work, "steps.tsv")) if x.strip()]
    total = sum(float(s[2]) for s in steps if len(s) > 2 and s[2])
    rows, failed = [], []
    for s in steps:
        name, rc, secs = s[0], s[1], s[2] if len(s) > 2 else "0"
        box = s[3] if len(s) > 3 else ""
        if rc.startswith("skip:"):
            res, why = "not run", rc[5:]
            if not why.startswith("n/a"):
                failed.append(name)
        elif rc == "0":
            res, why = "ok", ""
        elif rc == str(NA_CODE) and name in ("sanitizer", "pytest"):
            res, why = "n/a", ""
        elif rc in ("124", "137"):
            res, why = f"TIMEOUT ({box} s box)", ""
            failed.append(name)
        else:
            res, why = f"FAILED (exit {rc})", ""
            failed.append(name)
        text = why or detail(name, work, out, mode)
        rows.append(f"| {name} | {res} | {float(secs):.0f} | {text.replace('|', '/')} |")
    env = lines(os.path.join(work, "env.log"))
    dev = next((x[7:] for x in env if x.startswith("device ")), "?")
    if mode == "nogpu":
        verdict = (
            "NO GPU PRESENT: pre-flight checks passed, nothing was run on a GPU (exit 3)"
            if not failed
            else f"NO GPU PRESENT, and pre-flight checks FAILED: {', '.join(failed)} (exit 1)"
        )
        code = 1 if failed else 3
    else:
        verdict = (
            "PASS: every step passed (exit 0)"
            if not failed
            else f"FAIL: {', '.join(failed)} (exit 1)"
        )
        code = 1 if failed else 0
    commit = next((x[5:] for x in env if x.startswith("git: ")), "?")
    md = [
        f"# kdfused GPU check: {verdict}",
        "",
        f"device: {dev} | commit {commit} | {total:.0f} s of steps",
        "",
        "| step | result | s | details |",
        "|---|---|---:|---|",
    ] + rows
    if mode == "gpu":
        md += bench_table(out)
    md += [
        "",
        "Files: selftest.txt (self-test table), pytest.txt (CUDA tests), sanitizer.txt, "
        "bench.csv/json/png, logs.tar.gz (every step's full log).",
    ]
    what = [f"{k}: {v}" for k, v in WHAT.items() if any(s[0] == k for s in steps)]
    md += ["", "Steps: " + "; ".join(what) + "."]
    text = "\n".join(md) + "\n"
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(text)
    print(text)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv))
