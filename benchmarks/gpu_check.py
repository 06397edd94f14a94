#!/usr/bin/env python
"""The driver of benchmarks/gpu_check.sh: the steps in order, each in a time box cut from one
budget, a verdict per step, and summary.md written after every step (so that a crash, a kill or
a step that hangs still leaves the verdicts of the steps before it).

    python benchmarks/gpu_check.py OUTDIR           (what gpu_check.sh runs)

Modes: "gpu" (a GPU is present): build for that GPU only and run everything on it; "rehearsal"
(no GPU, or GPU_CHECK_REHEARSAL=1): the same steps, each collecting its work (test ids, self-test
paths, sanitizer cases, benchmark cases) and printing counts and budgets, the build against the
local one; nothing runs on a GPU.

Each step is `python benchmarks/gpu_steps.py STEP REPORT --budget S [--rehearse]` (the step's own
deadline is S, a few seconds inside its box); the step writes REPORT, whose last line starting
with "RESULT:" is the one-line detail of summary.md. Step exit codes: 0 ok, 1 failed, 3 not
available on this machine (no tool, no GPU: neither a pass nor a failure of the kernels),
4 inconclusive (e.g. a sanitizer run cut by its deadline with no error reported), 124 the step hit
its own deadline (what it finished is in its report). A step killed by its box is "timed out".

Exit status: 0 every step ok (or n/a, inconclusive); 1 a step failed or timed out; 2 usage;
3 no GPU present and GPU_CHECK_REHEARSAL not set: the rehearsal passed, nothing ran on a GPU.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PY = sys.executable
GRACE_S = 8  # seconds between a step's own deadline and the end of its box
MIN_BOX = 10  # a step that would get less is not started ("the budget was spent")
STEP_SCRIPT = os.path.join(HERE, "gpu_steps.py")
# What OUTDIR gets (at most 10 files, each under 16 MiB): the step reports under these names,
# summary.md, and every log packed in logs.tar.gz.
COPIED = {
    "selftest.txt": "selftest.txt",
    "pytest.txt": "pytest.txt",
    "sanitizer.txt": "sanitizer.txt",
    "runtime.txt": "runtime.txt",
    "bench/bench.csv": "bench.csv",
    "bench/bench.json": "bench.json",
    "bench/linear.csv": "linear.csv",
    "bench/linear.json": "linear.json",
}
OUT_FILES = ["summary.md", "logs.tar.gz", *COPIED.values()]
CAP = 15 << 20

# Exit codes of a step
OK, FAILED, NA, INCONCLUSIVE, OWN_DEADLINE = 0, 1, 3, 4, 124


@dataclass
class Step:
    name: str
    what: str
    box: int  # the most seconds this step gets
    keep: int  # the seconds the steps before it must leave for it
    needs: tuple = ()  # steps that must be ok first
    status: str = "pending"
    detail: str = ""
    seconds: float = 0.0
    given: int = 0


def steps_for(mode: str) -> list[Step]:
    st = [
        Step("env", "machine, GPU, torch, nvcc, tools, packages", 30, 5),
        Step("files", "the check's own scripts exist and compile", 30, 5),
    ]
    if os.path.isdir(os.path.join(ROOT, "wheels")):
        st.append(Step("wheels", "offline wheels (wheels/) installed", 90, 10))
    st += [
        Step("build", "build in place for this GPU's architecture only", 240, 100),
        Step("import", "the fresh build imports, with CUDA kernels", 30, 10, ("build",)),
        Step(
            "selftest",
            "python -m kdfused.selftest --device cuda (every plan, linear, top-k)",
            120,
            60,
            ("import",),
        ),
        Step("pytest", "the curated CUDA tests, most informative first", 150, 90, ("import",)),
        Step("sanitizer", "compute-sanitizer on a small subset", 90, 45, ("import",)),
        Step("nccl", "process_group= on a world-size-1 nccl group", 45, 20, ("import",)),
        Step(
            "streams",
            "non-default stream; CUDA graph capture of a training step",
            45,
            20,
            ("import",),
        ),
        Step(
            "bench",
            "kdfused vs eager, torch.compile, Liger at LM sizes; fused linear vs TRL, Liger",
            180,
            60,
            ("import",),
        ),
    ]
    return st


def verdict(rc, killed: bool) -> str:
    if killed:
        return "timed out"
    return {
        OK: "ok",
        FAILED: "FAILED",
        NA: "n/a",
        INCONCLUSIVE: "inconclusive",
        OWN_DEADLINE: "timed out",
    }.get(rc, f"FAILED (exit {rc})")


def result_line(report: str, log: str) -> str:
    for path in (report, log):
        try:
            with open(path, errors="replace") as f:
                lines = f.read().splitlines()
        except OSError:
            continue
        hit = [x[7:].strip() for x in lines if x.startswith("RESULT:")]
        if hit:
            return hit[-1]
        if path == log and lines:
            return lines[-1].strip()[:200]
    return ""


def run_step(step: Step, box: int, work: str, mode: str, env: dict) -> None:
    import gpu_steps

    report = os.path.join(work, f"{step.name}.txt")
    log = os.path.join(work, f"{step.name}.log")
    cmd = [PY, STEP_SCRIPT, step.name, report]
    cmd += ["--budget", str(max(5, box - GRACE_S))]
    if mode == "rehearsal":
        cmd.append("--rehearse")
    rc, step.seconds = gpu_steps.run(cmd, log, box, env=env)  # killed at the end of the box
    killed = rc == "timeout"
    step.status = verdict(rc, killed)
    step.detail = result_line(report, log)
    if killed:
        step.detail = f"killed at the end of its {box} s box; before that: {step.detail}"


def copy_capped(src: str, dst: str) -> None:
    """dst = src, or its first and last 7 MiB when it is larger than 15 MiB."""
    if not os.path.isfile(src):
        return
    if os.path.getsize(src) <= CAP:
        shutil.copyfile(src, dst)
        return
    with open(src, "rb") as f, open(dst, "wb") as g:
        g.write(f.read(7 << 20))
        g.write(b"\n[... cut: the file was larger than 15 MiB ...]\n")
        f.seek(-(7 << 20), os.SEEK_END)
        g.write(f.read())


def pack_logs(work: str, dst: str) -> None:
    """Every log of the run, in one archive under 16 MiB (large logs cut first)."""
    names = sorted(os.listdir(work))
    with tarfile.open(dst + ".part", "w:gz") as tar:
        for name in names:
            path = os.path.join(work, name)
            if os.path.isfile(path) and os.path.getsize(path) > CAP:
                copy_capped(path, path + ".cut")
                os.replace(path + ".cut", path)
            tar.add(path, arcname=name)
    if os.path.getsize(dst + ".part") > (16 << 20):  # still too big: the step reports only
        with tarfile.open(dst + ".part", "w:gz") as tar:
            for name in names:
                if name.endswith(".txt"):
                    tar.add(os.path.join(work, name), arcname=name)
    os.replace(dst + ".part", dst)


def main(argv) -> int:
    if len(argv) != 2 or argv[1].startswith("-"):
        print("usage: python benchmarks/gpu_check.py OUTDIR", file=sys.stderr)
        return 2
    out = os.path.abspath(argv[1])
    os.makedirs(out, exist_ok=True)
    for name in OUT_FILES:  # no stale results from an earlier run
        if os.path.exists(os.path.join(out, name)):
            os.remove(os.path.join(out, name))
    work = tempfile.mkdtemp(prefix="kdfused_gpu_check.")
    budget = int(os.environ.get("GPU_CHECK_BUDGET_S", "510"))
    gpu = _gpu_present()
    forced = os.environ.get("GPU_CHECK_REHEARSAL", "") == "1"
    mode = "rehearsal" if forced or not gpu else "gpu"
    env = dict(os.environ, PYTHONUNBUFFERED="1", GPU_CHECK_MODE=mode)
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    steps = steps_for(mode)
    t0 = time.monotonic()
    print(f"kdfused GPU check ({mode}), budget {budget} s, results in {out}", flush=True)
    if mode == "rehearsal" and not forced:
        print("no GPU present: a rehearsal of every step, nothing runs on a GPU", flush=True)

    import gpu_summary

    def write_summary(note: str = "") -> int:
        for report, name in COPIED.items():
            copy_capped(os.path.join(work, report), os.path.join(out, name))
        code = gpu_summary.write(out, work, mode, steps, budget, time.monotonic() - t0, note)
        pack_logs(work, os.path.join(out, "logs.tar.gz"))
        return code

    def on_signal(signum, _frame):
        write_summary(f"the check itself was stopped by signal {signum}")
        sys.exit(1)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        for i, step in enumerate(steps):
            bad = [n for n in step.needs if next(s for s in steps if s.name == n).status != "ok"]
            left = budget - (time.monotonic() - t0) - sum(s.keep for s in steps[i + 1 :])
            box = int(min(step.box, left))
            if bad:
                step.status, step.detail = "not run", f"needs {', '.join(bad)}"
            elif box < min(MIN_BOX, step.box):
                step.status, step.detail = "not run", f"the budget of {budget} s was spent"
            else:
                step.given = box
                print(f"== [{step.name}] {step.what}; time box {box} s", flush=True)
                run_step(step, box, work, mode, env)
            print(
                f"   [{step.name}] {step.status} in {step.seconds:.0f} s"
                + (f" of {step.given} s" if step.given else "")
                + f": {step.detail}",
                flush=True,
            )
            write_summary()
    except BaseException as exc:  # noqa: BLE001 -- the verdict file is written whatever happens
        write_summary(f"the check itself crashed: {type(exc).__name__}: {exc}")
        raise
    code = write_summary()
    shutil.rmtree(work, ignore_errors=True)
    print(f"================ kdfused GPU check: {time.monotonic() - t0:.0f} s")
    with open(os.path.join(out, "summary.md")) as f:
        print(f.read())
    if mode == "rehearsal" and not forced and code == 0:
        return 3
    return code


def _gpu_present() -> bool:
    try:
        r = subprocess.run(
            [PY, "-c", "import torch; print(int(torch.cuda.is_available()))"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        return r.stdout.strip().endswith("1")
    except (OSError, subprocess.SubprocessError):
        return False


if __name__ == "__main__":
    sys.path.insert(0, HERE)
    sys.exit(main(sys.argv))
