#!/usr/bin/env python
"""The steps of benchmarks/gpu_check.sh that are easier in Python than in bash.

Size: one function per step of gpu_check.sh, each short; kept in one file so that the script
calls one program.

    python benchmarks/gpu_steps.py env                      machine, GPU, torch, nvcc, packages
    python benchmarks/gpu_steps.py arch                     the GPU's TORCH_CUDA_ARCH_LIST ("9.0")
    python benchmarks/gpu_steps.py pytest REPORT [--budget S] [--list]
    python benchmarks/gpu_steps.py sanitizer REPORT [--budget S] [--selftest-args "..."]
    python benchmarks/gpu_steps.py bench OUTDIR [--budget S] [--cpu-smoke]

pytest: the CUDA tests (``-k cuda``). Tests that give an out-of-range label value to the GPU stop
the kernel with a device-side assert, after which the process's CUDA context is unusable: they
are left out of the main run and run each in a process of their own. ``--list`` only collects
and prints that split (no GPU needed). Exit 0 when everything passed.

sanitizer: compute-sanitizer memcheck, racecheck and synccheck, side by side, on ``python -m
kdfused.selftest --device cuda --quick``. Exit 0: no errors; 1: errors found (or the self-test
failed or timed out under the tool); 3: the tool is not available on this machine (absent, or
it cannot run even a trivial CUDA program there, as on some virtualised GPUs) or no GPU.

bench: benchmarks/run.py on the GPU-sized quick set (kdfused, eager, compile, and Liger's losses
when importable), with per-case time limits that fit the budget; writes bench.csv/json/png.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import glob
import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PY = sys.executable
# Bad-input tests whose label *values* are checked on the GPU (a device-side assert).
DEVICE_ASSERT = re.compile(
    r"^tests/test_inputs\.py::test_bad_input\[cuda-labels-(?!shape|float|bool)"
)


def have(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def run(cmd, log, timeout, env=None):
    """Runs cmd with its output to the file ``log``; (return code or 'timeout', seconds)."""
    t0 = time.monotonic()
    with open(log, "w") as f:
        p = subprocess.Popen(
            cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=env, start_new_session=True
        )
        try:
            rc = p.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, 9)
            p.wait()
            rc = "timeout"
    return rc, time.monotonic() - t0


def tail(path, n=15):
    try:
        with open(path, errors="replace") as f:
            return f.read().splitlines()[-n:]
    except OSError:
        return []


# ------------------------------------------------------------------------------------ env
def cmd_env(_args) -> int:
    import platform

    print("python", sys.version.split()[0], platform.machine(), PY)
    try:
        import torch

        print(
            "torch",
            torch.__version__,
            "cuda",
            torch.version.cuda,
            "available",
            torch.cuda.is_available(),
        )
        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            print(
                f"device {p.name} sm_{p.major}{p.minor} SMs {p.multi_processor_count} "
                f"mem {p.total_memory / 2**30:.1f} GiB"
            )
        else:
            print("device none: no GPU present")
    except Exception as exc:  # noqa: BLE001
        print("torch import failed:", exc)
        return 1
    for m in (
        "pytest",
        "hypothesis",
        "pytest_benchmark",
        "numpy",
        "matplotlib",
        "tqdm",
        "triton",
        "ninja",
        "pybind11",
        "liger_kernel",
        "transformers",
    ):
        print(m, "present" if have(m) else "MISSING")
    for tool in ("nvcc", "nvidia-smi", "compute-sanitizer"):
        print(tool, find_tool(tool) or "not found")
    return 0


def find_tool(name):
    hits = [shutil.which(name)] + sorted(glob.glob(f"/usr/local/cuda*/bin/{name}"))
    home = os.environ.get("CUDA_HOME")
    if home:
        hits.insert(1, os.path.join(home, "bin", name))
    return next((h for h in hits if h and os.access(h, os.X_OK)), None)


def cmd_arch(_args) -> int:
    import torch

    if not torch.cuda.is_available():
        print("no GPU present", file=sys.stderr)
        return 1
    major, minor = torch.cuda.get_device_capability(0)
    print(f"{major}.{minor}")
    return 0


# ------------------------------------------------------------------------------------ pytest
def pytest_base():
    files = ["tests"] + (["benchmarks/test_bench.py"] if have("pytest_benchmark") else [])
    extra = ["--benchmark-disable"] if have("pytest_benchmark") else []
    return [PY, "-m", "pytest", *files, "-k", "cuda", "-p", "no:cacheprovider", *extra]


def cmd_pytest(args) -> int:
    deadline = time.monotonic() + args.budget
    out = [f"CUDA tests: {' '.join(pytest_base()[1:])}"]
    if not have("pytest"):
        out.append("pytest is not installed for this python: CUDA tests not run")
        write(args.report, out)
        return 3
    col = os.path.join(os.path.dirname(os.path.abspath(args.report)), "pytest-collect.log")
    rc, _ = run(
        pytest_base() + ["--collect-only", "-q", "--continue-on-collection-errors"],
        col,
        deadline - time.monotonic(),
    )
    ids = [x.strip() for x in tail(col, 10**6) if "::" in x and not x.startswith(" ")]
    isolated = [i for i in ids if DEVICE_ASSERT.search(i)]
    out.append(
        f"collected {len(ids)} CUDA test ids (collection exit code {rc}), of which "
        f"{len(isolated)} run one per process"
    )
    out.append("one per process (bad label values stop the kernel with a device-side assert):")
    out += [f"  {i}" for i in isolated]
    if rc not in (0, 5) or not ids:
        out += ["collection FAILED:"] + tail(col, 30)
    if not isolated:
        out.append("warning: no device-assert tests found: the main run includes any such test")
    if args.list:
        write(args.report, out)
        return 0 if rc == 0 and ids else 1
    main_log = args.report + ".main"
    left = deadline - time.monotonic() - (25 if isolated else 0)
    cmd = pytest_base() + ["-q", "-rfE", "--continue-on-collection-errors", "--durations=10"]
    cmd += [a for i in isolated for a in ("--deselect", i)]
    rc_main, secs = run(cmd, main_log, left)
    body = tail(main_log, 400)
    out += ["", f"== main run: exit code {rc_main}, {secs:.0f} s"] + body
    ok = rc_main == 0
    results = []
    if isolated:
        left = max(10.0, deadline - time.monotonic())

        def one(i, k):
            log = f"{args.report}.iso{k}"
            rc, s = run([PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", i], log, left)
            return i, rc, s, log

        with concurrent.futures.ThreadPoolExecutor(4) as ex:
            results = list(ex.map(lambda a: one(*a), [(i, k) for k, i in enumerate(isolated)]))
        out += ["", "== one process per test (device-side assert expected inside the test):"]
        for i, rc, s, log in results:
            out.append(f"  {'PASS' if rc == 0 else 'FAIL'} {i} (exit code {rc}, {s:.0f} s)")
            if rc != 0:
                out += [f"      {x}" for x in tail(log, 12)]
        ok = ok and all(rc == 0 for _, rc, _, _ in results)
    last = next((x for x in reversed(body) if re.search(r"passed|failed|error|no tests", x)), "")
    n_iso = sum(rc == 0 for _, rc, _, _ in results)
    out += [
        "",
        f"CUDA tests {'PASSED' if ok else 'FAILED'}: main run: "
        f"{'TIMEOUT' if rc_main == 'timeout' else last.strip('= ')}; "
        f"isolated: {n_iso}/{len(isolated)} passed",
    ]
    write(args.report, out)
    return 0 if ok else 1


def write(path, lines):
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


# ------------------------------------------------------------------------------------ sanitizer
SAN_ERR = re.compile(r"^========= (Invalid|Error|Program hit|Barrier|Race|.*hazard|Uninit|Leak)")


def sanitizer_verdict(rc, secs, lines):
    """("ok: ..." or what went wrong, the error lines) of one compute-sanitizer run."""
    errs = [x for x in lines if SAN_ERR.match(x) and "SUMMARY" not in x]
    summ = [x.strip("= ") for x in lines if "ERROR SUMMARY" in x or "RACECHECK SUMMARY" in x]
    selftest = next((x for x in reversed(lines) if "kdfused self-test" in x), "")
    if rc == "timeout":
        return (
            f"TIMEOUT after {secs:.0f} s: {len(errs)} error lines before it"
            if errs
            else f"TIMEOUT after {secs:.0f} s, no errors in the part that ran"
        ), errs
    if rc == 9 or errs:
        return f"ERRORS FOUND ({'; '.join(summ) or len(errs)})", errs
    if rc == 0:
        return f"ok: {'; '.join(summ) or 'no errors'}", errs
    return (
        f"FAILED under the tool (exit code {rc}): "
        f"{selftest or (lines[-1] if lines else 'no output')}"
    ), errs


def cmd_sanitizer(args) -> int:
    deadline = time.monotonic() + args.budget
    out = []
    cs = find_tool("compute-sanitizer")
    try:
        import torch

        gpu = torch.cuda.is_available()
    except Exception:  # noqa: BLE001
        gpu = False
    if not cs:
        out.append(
            "compute-sanitizer: tool unavailable on this machine (not on PATH, not in "
            "$CUDA_HOME/bin or /usr/local/cuda*/bin)"
        )
    else:
        out.append(f"compute-sanitizer: {cs}")
    if not gpu:
        out.append("no GPU present: the sanitizers were not run")
    if not cs or not gpu:
        write(args.report, out)
        return 3
    logdir = os.path.dirname(os.path.abspath(args.report))
    probe = os.path.join(logdir, "sanitizer-probe.log")
    code = (
        "import torch; x = torch.ones(8, device='cuda'); torch.cuda.synchronize(); "
        "print('probe ok', float(x.sum()))"
    )
    rc, _ = run(
        [cs, "--tool", "memcheck", "--error-exitcode", "9", PY, "-c", code],
        probe,
        min(90.0, deadline - time.monotonic()),
    )
    if rc != 0 or not any("probe ok" in x for x in tail(probe, 50)):
        out.append(
            f"tool unavailable on this machine: compute-sanitizer cannot run a trivial "
            f"CUDA program here (exit code {rc}); its last lines:"
        )
        out += [f"    {x}" for x in tail(probe, 8)]
        write(args.report, out)
        return 3
    target = [PY, "-m", "kdfused.selftest", "--device", "cuda", "--quick"]
    target += shlex.split(args.selftest_args)
    tools = ["memcheck", "racecheck", "synccheck"]

    def one(tool):  # the three tools run side by side, each with the whole time left
        log = os.path.join(logdir, f"sanitizer-{tool}.log")
        env = dict(os.environ)
        if tool == "memcheck":  # every tensor its own allocation: out-of-bounds is seen
            env["PYTORCH_NO_CUDA_MEMORY_CACHING"] = "1"
        # API errors are not reported: the launcher queries cluster support and clears the error
        cmd = [
            cs,
            "--tool",
            tool,
            "--error-exitcode",
            "9",
            "--print-limit",
            "30",
            "--report-api-errors",
            "no",
            *target,
        ]
        return (tool, *run(cmd, log, deadline - time.monotonic(), env), log)

    with concurrent.futures.ThreadPoolExecutor(len(tools)) as ex:
        results = list(ex.map(one, tools))
    status = 0
    for tool, rc, secs, log in results:
        lines = tail(log, 10**6)
        verdict, errs = sanitizer_verdict(rc, secs, lines)
        if not verdict.startswith("ok"):
            status = 1
        out.append(f"{tool}: {verdict} ({secs:.0f} s)")
        out += [f"    {x}" for x in errs[:40]]
        if not verdict.startswith("ok"):
            out += ["    last lines:"] + [f"    {x}" for x in lines[-15:]]
    out.append(f"target: {' '.join(target[1:])}")
    write(args.report, out)
    return status


# ------------------------------------------------------------------------------------ bench
def cmd_bench(args) -> int:
    sys.path.insert(0, HERE)
    import run as bench_run  # benchmarks/run.py

    if args.cpu_smoke:  # no GPU: the pipeline on a tiny CPU case (providers, CSV/JSON, plot)
        cmd = [
            PY,
            os.path.join(HERE, "run.py"),
            "--device",
            "cpu",
            "--sizes",
            "64x1000",
            "--providers",
            "kdfused,eager",
            "--target-s",
            "0.05",
            "--min-reps",
            "2",
            "--out",
            args.outdir,
            "--tag",
            "bench-cpu-smoke",
            "--timeout",
            "120",
        ]
    else:
        provs = ["kdfused", "eager", "compile"]
        provs += ["liger_kl", "liger_jsd"] if have("liger_kernel") else []
        sizes = bench_run.SETS["quick-cuda"]
        per_case = max(8.0, (args.budget - 30) / (len(provs) * len(sizes) + 2))
        cmd = [
            PY,
            os.path.join(HERE, "run.py"),
            "--device",
            "cuda",
            "--set",
            "quick",
            "--providers",
            ",".join(provs),
            "--target-s",
            "0.2",
            "--out",
            args.outdir,
            "--tag",
            "bench",
            "--timeout",
            f"{per_case:.0f}",
        ]
    print("$", " ".join(cmd), flush=True)
    return subprocess.run(cmd, cwd=ROOT, stdin=subprocess.DEVNULL).returncode


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("env")
    sub.add_parser("arch")
    p = sub.add_parser("pytest")
    p.add_argument("report")
    p.add_argument("--budget", type=float, default=150)
    p.add_argument("--list", action="store_true")
    p = sub.add_parser("sanitizer")
    p.add_argument("report")
    p.add_argument("--budget", type=float, default=150)
    p.add_argument("--selftest-args", default="", help="extra self-test arguments, one string")
    p = sub.add_parser("bench")
    p.add_argument("outdir")
    p.add_argument("--budget", type=float, default=150)
    p.add_argument("--cpu-smoke", action="store_true")
    args = ap.parse_args(argv)
    return {
        "env": cmd_env,
        "arch": cmd_arch,
        "pytest": cmd_pytest,
        "sanitizer": cmd_sanitizer,
        "bench": cmd_bench,
    }[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
