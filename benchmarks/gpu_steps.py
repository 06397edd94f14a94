#!/usr/bin/env python
"""The steps of benchmarks/gpu_check.sh (driven by gpu_check.py), one function each.

    python benchmarks/gpu_steps.py STEP REPORT --budget S [--rehearse]
    python benchmarks/gpu_steps.py arch          the GPU's TORCH_CUDA_ARCH_LIST entry ("9.0")

STEP is env, files, wheels, build, import, selftest, pytest, sanitizer, nccl, streams or bench.
Each writes REPORT (its last "RESULT:" line is the step's detail in summary.md), keeps to its own
deadline of S seconds (what it finished by then is reported), and exits 0 ok, 1 failed,
3 not available here, 4 inconclusive, 124 deadline reached. With --rehearse (no GPU) a step
collects the work it would do on a GPU (test ids, self-test paths, sanitizer cases, benchmark
cases), prints counts and budgets, and exits 0 when that worked: a check of the harness itself.

Size: the steps are short; the curated test list and the sanitizer subset are at the top.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import glob
import importlib.util
import json
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
OK, FAILED, NA, INCONCLUSIVE, OWN_DEADLINE = 0, 1, 3, 4, 124

# The CUDA tests (-k cuda), most informative first: one pytest run starts them in this order, so
# a run cut by its time box loses the tail. (group, files)
CUDA_TESTS = [
    ("plans", ["tests/test_cuda_plans.py"]),  # every launch plan x divergence (self-test cases)
    ("kd_loss", ["tests/test_kd_loss.py", "tests/test_divergences.py", "tests/test_numerics.py"]),
    ("inputs", ["tests/test_inputs.py"]),
    ("topk", ["tests/test_topk_conventions.py", "tests/test_topk.py", "tests/test_linear_topk.py"]),
    ("linear", ["tests/test_linear.py"]),
    ("vocab_parallel", ["tests/test_vocab_parallel_ops.py"]),
    ("autograd", ["tests/test_autograd.py", "tests/test_function.py", "tests/test_module.py"]),
    ("compile_opcheck", ["tests/test_ops.py"]),
    ("properties", ["tests/test_properties.py"]),
]
# compute-sanitizer: (tool, self-test --paths); every run with --quick --divergences kl,jsd
SANITIZER_RUNS = [
    ("memcheck", "cuda:warp,cuda:block,cuda:cluster:2,cuda:two_phase:2,cuda:linear,cuda:topk"),
    ("synccheck", "cuda:warp,cuda:block,cuda:cluster:2,cuda:two_phase:2"),
    ("racecheck", "cuda:block,cuda:cluster:2"),
]
SANITIZER_SELFTEST = ["--device", "cuda", "--quick", "--divergences", "kl,jsd"]
# The benchmark: cases in order of interest, and what a compile of each costs at most (seconds,
# first compile of a new shape; measured by the step as it goes is not possible in one process).
BENCH_CASES = ["2048x32000", "8192x128256:bf16", "4096x1000", "16384x151936:bf16"]
BENCH_COST_S = {"start": 15, "case": 6, "compile_case": 45}
# Its second part: benchmarks/linear_bench.py, the fused linear + loss against TRL's and Liger's
# chunked losses on the loss they all compute (TRL's soft JSD), each provider in a process of its
# own, on what run.py left of the step's budget. What one process costs at most (start, CUDA and
# imports; warm-up with Triton compiles and 3 runs), the least time worth starting it with, and
# run.py's share of the budget (it runs first and keeps at least this fraction).
LINEAR_SIZE = "4096,1024,32000"
LINEAR_PROVIDERS = ["kdfused-linear", "kdfused-trl", "trl", "liger", "kdfused"]
LINEAR_REHEARSAL_SIZE = "256,64,1000"
LINEAR_COST_S = {"start": 12, "provider": 8}
LINEAR_MIN_S = 30
RUN_PY_SHARE = 0.6


def have(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def run(cmd, log, timeout, env=None, append=False):
    """Runs cmd with its output to the file ``log``; (return code or 'timeout', seconds)."""
    t0 = time.monotonic()
    with open(log, "a" if append else "w") as f:
        f.write(f"$ {shlex.join(cmd)}\n")
        f.flush()
        p = subprocess.Popen(
            cmd,
            stdout=f,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=ROOT,
            env=env,
            start_new_session=True,
        )
        try:
            rc = p.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, 15)
            try:
                p.wait(timeout=5)
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


class Report:
    """The step's report file: lines as they come (printed too), RESULT last."""

    def __init__(self, path):
        self.path = path
        open(path, "w").close()

    def __call__(self, *lines):
        with open(self.path, "a") as f:
            for x in lines:
                f.write(f"{x}\n")
                print(x, flush=True)

    def result(self, text, code):
        self(f"RESULT: {text}")
        return code


def find_tool(name):
    hits = [shutil.which(name)] + sorted(glob.glob(f"/usr/local/cuda*/bin/{name}"))
    home = os.environ.get("CUDA_HOME")
    if home:
        hits.insert(1, os.path.join(home, "bin", name))
    return next((h for h in hits if h and os.access(h, os.X_OK)), None)


def gpu_arch():
    import torch

    major, minor = torch.cuda.get_device_capability(0)
    return f"{major}.{minor}"


# ------------------------------------------------------------------------------------ env
def step_env(a, rep: Report) -> int:
    import platform

    def sh(*cmd):  # a command's output, or "" (no git in a copied tree, a tool that hangs)
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout
        except (OSError, subprocess.SubprocessError):
            return ""

    git = sh("git", "-C", ROOT, "rev-parse", "--short", "HEAD").strip()
    dirty = sh("git", "-C", ROOT, "status", "--porcelain").count("\n")
    rep(f"git: {git or '?'} ({dirty} changed files)", f"python {sys.version.split()[0]} {PY}")
    rep(f"machine {platform.machine()}, {os.cpu_count()} CPUs")
    try:
        import torch
    except Exception as exc:  # noqa: BLE001
        return rep.result(f"torch does not import: {exc}", FAILED)
    rep(f"torch {torch.__version__} cuda {torch.version.cuda}")
    device = "none (no GPU present)"
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        device = (
            f"{p.name} sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, "
            f"{p.total_memory / 2**30:.0f} GiB"
        )
    rep(f"device {device}")
    mods = ["pytest", "xdist", "hypothesis", "pytest_benchmark", "numpy", "matplotlib", "tqdm"]
    mods += ["triton", "ninja", "liger_kernel", "transformers", "trl"]
    rep("python packages: " + ", ".join(f"{m} {'yes' if have(m) else 'NO'}" for m in mods))
    tools = {t: find_tool(t) for t in ("nvcc", "nvidia-smi", "compute-sanitizer")}
    rep("tools: " + ", ".join(f"{t} {p or 'not found'}" for t, p in tools.items()))
    if tools["nvcc"]:
        out = sh(tools["nvcc"], "--version")
        release = (re.findall(r"release [\d.]+", out) or ["?"])[0]
        rep(f"nvcc {release}")
    if tools["nvidia-smi"]:
        rep(*sh(tools["nvidia-smi"]).splitlines())
    return rep.result(f"{device}; torch {torch.__version__}", OK)


# ------------------------------------------------------------------------------------ files
CHECK_FILES = [
    "benchmarks/gpu_check.sh",
    "benchmarks/gpu_check.py",
    "benchmarks/gpu_steps.py",
    "benchmarks/gpu_summary.py",
    "benchmarks/gpu_runtime.py",
    "benchmarks/_gpu_pytest_plugin.py",
    "benchmarks/run.py",
    "benchmarks/_worker.py",
    "benchmarks/_providers.py",
    "benchmarks/linear_bench.py",
    "benchmarks/_procinfo.py",
    "kdfused/selftest.py",
    "kdfused/_selftest_cases.py",
    "setup.py",
]


def step_files(a, rep: Report) -> int:
    bad = []
    for f in CHECK_FILES + [f for _, fs in CUDA_TESTS for f in fs]:
        path = os.path.join(ROOT, f)
        if not os.path.isfile(path):
            bad.append(f"missing {f}")
        elif f.endswith(".py"):
            try:
                compile(open(path).read(), f, "exec")
            except SyntaxError as exc:
                bad.append(f"{f} does not compile: {exc}")
    r = subprocess.run(["bash", "-n", os.path.join(HERE, "gpu_check.sh")], capture_output=True)
    if r.returncode:
        bad.append("gpu_check.sh: bash -n failed")
    rep(*bad)
    if bad:
        return rep.result("; ".join(bad)[:300], FAILED)
    return rep.result(f"{len(CHECK_FILES)} scripts and the curated test files present", OK)


def step_wheels(a, rep: Report) -> int:
    wheels = sorted(glob.glob(os.path.join(ROOT, "wheels", "*.whl")))
    cmd = [PY, "-m", "pip", "install", "-q", "--no-index", "--no-deps", *wheels]
    if a.rehearse:
        rep(f"would run: {shlex.join(cmd)}")
        return rep.result(f"{len(wheels)} wheels would be installed", OK)
    rc, secs = run(cmd, rep.path + ".log", a.budget)
    rep(*tail(rep.path + ".log", 20))
    return rep.result(f"{len(wheels)} wheels, pip exit code {rc}", OK if rc == 0 else FAILED)


# ------------------------------------------------------------------------------------ build
def cuda_sources():
    return sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "**", "*.cu"), recursive=True))


def step_build(a, rep: Report) -> int:
    env = dict(os.environ)
    n_cu = len(cuda_sources())
    n_cpp = len(glob.glob(os.path.join(ROOT, "csrc", "**", "*.cpp"), recursive=True))
    jobs = str(os.cpu_count() or 2)
    if a.rehearse:
        rep(
            "on a GPU: rm kdfused/_C*.so; KDFUSED_CUDA=1 TORCH_CUDA_ARCH_LIST=<the GPU's> "
            f"MAX_JOBS=<cores> python setup.py build_ext --inplace ({n_cpp} C++ and {n_cu} CUDA "
            "translation units)",
            "here: the same command with this machine's settings, against the local build",
        )
    else:
        env.update(KDFUSED_CUDA="1", TORCH_CUDA_ARCH_LIST=gpu_arch())
        env["MAX_JOBS"] = env.get("MAX_JOBS", jobs)
        rep(
            f"KDFUSED_CUDA=1 TORCH_CUDA_ARCH_LIST={env['TORCH_CUDA_ARCH_LIST']} "
            f"MAX_JOBS={env['MAX_JOBS']} ({n_cpp} C++ and {n_cu} CUDA translation units)"
        )
        for so in glob.glob(os.path.join(ROOT, "kdfused", "_C*.so")):
            os.remove(so)  # a failed build must not leave an older library to import
    log = rep.path + ".log"
    rc, secs = run([PY, "setup.py", "build_ext", "--inplace"], log, a.budget, env=env)
    text = tail(log, 10**6)
    progress = [x for x in text if re.match(r"^\[\d+/\d+\]", x)]
    last = progress[-1].split("]")[0] + "]" if progress else "[no ninja progress]"
    errors = [x for x in text if re.search(r"\berror\b", x) and "warning" not in x][:10]
    rep(*text[-25:])
    if rc == "timeout":
        return rep.result(f"timed out after {secs:.0f} s at object {last}", OWN_DEADLINE)
    if rc != 0:
        rep("errors:", *errors)
        why = errors[0][:200] if errors else f"exit code {rc}"
        return rep.result(f"build FAILED after {secs:.0f} s: {why}", FAILED)
    what = "nothing to rebuild" if not progress else f"{len(progress)} objects"
    return rep.result(f"built in {secs:.0f} s ({what}; {n_cu} CUDA units in the tree)", OK)


# ------------------------------------------------------------------------------------ import
IMPORT_CHECK = r"""
import importlib, os, sys
import torch
import kdfused
root, mode = sys.argv[1], sys.argv[2]
C = importlib.import_module("kdfused._C")  # loaded lazily by the package: import it by name
lib = C.__file__
if os.path.dirname(os.path.realpath(lib)) != os.path.join(os.path.realpath(root), "kdfused"):
    sys.exit(f"kdfused._C was imported from {lib}, not from the build in {root}")
info = kdfused.build_info()
if mode == "gpu" and not info["cuda"]:
    sys.exit(f"the fresh build has no CUDA kernels: {info}")
print("ops:", torch.ops.kdfused.kd_loss)
print("RESULT: imported", os.path.relpath(lib, root), info)
"""


def step_import(a, rep: Report) -> int:
    mode = "rehearsal" if a.rehearse else "gpu"
    r = subprocess.run(
        [PY, "-c", IMPORT_CHECK, ROOT, mode],
        capture_output=True,
        text=True,
        timeout=a.budget,
        cwd=ROOT,
    )
    rep(*(r.stdout + r.stderr).splitlines()[-20:])
    if r.returncode:
        last = (r.stdout + r.stderr).strip().splitlines()[-1:] or ["?"]
        return rep.result(f"import FAILED: {last[0][:200]}", FAILED)
    return OK


# ------------------------------------------------------------------------------------ selftest
def step_selftest(a, rep: Report) -> int:
    extra = shlex.split(os.environ.get("GPU_CHECK_SELFTEST_ARGS", ""))
    cmd = [PY, "-m", "kdfused.selftest", "--device", "cuda", *extra]
    if a.rehearse:
        cmd.append("--list")
    log = rep.path + ".log"
    rc, secs = run(cmd, log, a.budget)
    text = tail(log, 10**6)
    rep(*text)
    if a.rehearse:
        n = [x for x in text if x.startswith("cuda:")]
        if rc != 0 or not n:
            return rep.result(f"could not list the self-test's CUDA paths (exit {rc})", FAILED)
        return rep.result(
            f"would run {len(n)} CUDA paths: {', '.join(x.split()[0] for x in n)}", OK
        )
    done = [x.strip() for x in text if re.match(r"^  cuda:\S+: ", x)]
    final = next((x for x in reversed(text) if x.startswith("kdfused self-test ")), "")
    if rc == "timeout":
        return rep.result(f"timed out after {len(done)} paths: {'; '.join(done)}", OWN_DEADLINE)
    return rep.result(final or f"exit code {rc}", OK if rc == 0 else FAILED)


# ------------------------------------------------------------------------------------ pytest
def pytest_cmd(log_jsonl, collect=False):
    files = [f for _, fs in CUDA_TESTS for f in fs]
    cmd = [PY, "-m", "pytest", *files, "-k", "cuda", "-p", "no:cacheprovider"]
    cmd += ["-p", "_gpu_pytest_plugin", "-q", "-o", "console_output_style=classic"]
    if collect:
        cmd += ["--collect-only"]
    elif have("xdist"):
        cmd += ["-n", str(min(8, os.cpu_count() or 1)), "--dist", "load"]
    env = dict(os.environ, GPU_CHECK_PYTEST_LOG=log_jsonl)
    env["PYTHONPATH"] = os.pathsep.join([HERE, ROOT, env.get("PYTHONPATH", "")])
    return cmd, env


def group_of(node_id):
    f = node_id.split("::")[0]
    return next((g for g, fs in CUDA_TESTS if f in fs), "other")


def read_outcomes(path):
    collected, outcomes = [], {}
    for line in tail(path, 10**7):
        rec = json.loads(line)
        if "collected" in rec:
            collected = rec["collected"]
        else:
            prev = outcomes.get(rec["id"])
            if prev is None or rec["outcome"] in ("failed", "error"):
                outcomes[rec["id"]] = rec
    return collected, outcomes


def step_pytest(a, rep: Report) -> int:
    if not have("pytest"):
        return rep.result("pytest is not installed for this python", NA)
    jsonl = rep.path + ".jsonl"
    open(jsonl, "w").close()
    cmd, env = pytest_cmd(jsonl, collect=a.rehearse)
    log = rep.path + ".log"
    rep(f"$ {shlex.join(cmd[1:])}" + ("" if have("xdist") else "   (pytest-xdist not present)"))
    rc, secs = run(cmd, log, a.budget, env=env)
    collected, outcomes = read_outcomes(jsonl)
    rep(f"pytest exit code {rc} after {secs:.0f} s; {len(collected)} tests collected")
    groups = {g: [0, 0, 0, 0, 0] for g, _ in CUDA_TESTS}  # passed failed error skipped not run
    for node in collected:
        rec = outcomes.get(node)
        k = ("passed", "failed", "error", "skipped").index(rec["outcome"]) if rec else 4
        groups.setdefault(group_of(node), [0] * 5)[k] += 1
    rep("group: passed / failed / error / skipped / not run")
    for g, c in groups.items():
        rep(f"  {g}: " + " / ".join(map(str, c)))
    if a.rehearse:
        empty = [g for g, c in groups.items() if sum(c) == 0]
        if rc != 0 or not collected or empty:
            rep(*tail(log, 30))
            why = f"collection exit code {rc}" + (
                f"; groups with no test: {empty}" if empty else ""
            )
            return rep.result(f"the curated CUDA tests do not collect: {why}", FAILED)
        return rep.result(
            f"would run {len(collected)} CUDA tests in {len(groups)} groups "
            f"({'xdist' if have('xdist') else 'one process'}), plugin records collection",
            OK,
        )
    bad = [r for r in outcomes.values() if r["outcome"] in ("failed", "error")]
    for r in bad:  # "F id -- first line": summary.md lists these
        rep(f"{'F' if r['outcome'] == 'failed' else 'E'} {r['id']} -- {r.get('first', '')}")
    slow = sorted(outcomes.values(), key=lambda r: -r["s"])[:10]
    rep("slowest:", *[f"  {r['s']:.1f} s {r['id']}" for r in slow])
    rep("last lines of pytest:", *tail(log, 15))
    tot = [sum(c[k] for c in groups.values()) for k in range(5)]
    text = (
        f"{tot[0]} passed, {tot[1]} failed, {tot[2]} errors, {tot[3]} skipped, "
        f"{tot[4]} not run of {len(collected)}"
    )
    if not collected:
        return rep.result(f"no test collected (pytest exit code {rc})", FAILED)
    if rc == "timeout":
        return rep.result(f"deadline reached: {text}", OWN_DEADLINE)
    return rep.result(text, OK if rc == 0 and not bad and tot[4] == 0 else FAILED)


# ------------------------------------------------------------------------------------ sanitizer
SAN_ERR = re.compile(r"^========= (Invalid|Error|Program hit|Barrier|Race|.*hazard|Uninit|Leak)")


def sanitizer_verdict(rc, secs, lines):
    """(status, text, error lines) of one compute-sanitizer run; status is ok, errors, failed or
    inconclusive (cut by the deadline with no error reported)."""
    errs = [x for x in lines if SAN_ERR.match(x) and "SUMMARY" not in x]
    summ = [x.strip("= ") for x in lines if "ERROR SUMMARY" in x or "RACECHECK SUMMARY" in x]
    selftest = next((x for x in reversed(lines) if "kdfused self-test" in x), "")
    if errs or rc == 9:
        return "errors", f"ERRORS FOUND ({'; '.join(summ) or len(errs)})", errs
    if rc == "timeout":
        return "inconclusive", f"inconclusive: cut after {secs:.0f} s, no error before it", errs
    if rc == 0:
        return "ok", f"ok: {'; '.join(summ) or 'no errors'}", errs
    return "failed", f"FAILED under the tool (exit code {rc}): {selftest or 'see log'}", errs


def step_sanitizer(a, rep: Report) -> int:
    deadline = time.monotonic() + a.budget
    cs = find_tool("compute-sanitizer")
    rep(f"compute-sanitizer: {cs or 'not found'}")
    targets = {
        tool: [PY, "-m", "kdfused.selftest", *SANITIZER_SELFTEST, "--paths", paths]
        for tool, paths in SANITIZER_RUNS
    }
    if a.rehearse:
        lines = []
        for tool, cmd in targets.items():
            r = subprocess.run([*cmd, "--list"], capture_output=True, text=True, cwd=ROOT)
            rep(f"{tool}: $ {shlex.join(cmd[1:])}", *r.stdout.splitlines())
            if r.returncode:
                return rep.result(f"{tool}: the self-test refuses its subset: {r.stdout}", FAILED)
            n = sum(x.startswith("cuda:") for x in r.stdout.splitlines())
            lines.append(f"{tool} {n} paths")
        return rep.result(
            "would run " + ", ".join(lines) + f"; tool {'found' if cs else 'NOT found'}", OK
        )
    if not cs:
        return rep.result("unavailable: compute-sanitizer not found", NA)
    probe = rep.path + ".probe.log"
    code = "import torch; x = torch.ones(8, device='cuda'); torch.cuda.synchronize(); print('ok')"
    rc, _ = run([cs, "--tool", "memcheck", PY, "-c", code], probe, min(60.0, a.budget / 3))
    if rc != 0 or not any(x.strip() == "ok" for x in tail(probe, 50)):
        rep(*tail(probe, 10))
        return rep.result(
            f"unavailable: the tool cannot run a trivial CUDA program (exit {rc})", NA
        )

    def one(tool):  # side by side, each with the whole time left
        log = f"{rep.path}.{tool}.log"
        env = dict(os.environ)
        if tool == "memcheck":  # every tensor its own allocation: out-of-bounds is seen
            env["PYTORCH_NO_CUDA_MEMORY_CACHING"] = "1"
        # API errors are not reported: the launcher queries cluster support and clears the error
        cmd = [cs, "--tool", tool, "--error-exitcode", "9", "--print-limit", "30"]
        cmd += ["--report-api-errors", "no", *targets[tool]]
        return (tool, *run(cmd, log, deadline - time.monotonic(), env), log)

    with concurrent.futures.ThreadPoolExecutor(len(targets)) as ex:
        results = list(ex.map(one, targets))
    states, parts = [], []
    for tool, rc, secs, log in results:
        lines = tail(log, 10**6)
        state, text, errs = sanitizer_verdict(rc, secs, lines)
        states.append(state)
        parts.append(f"{tool} {text}")
        rep(f"{tool}: {text} ({secs:.0f} s) on {dict(SANITIZER_RUNS)[tool]}")
        rep(*[f"    {x}" for x in errs[:40]])
        if state != "ok":
            rep("    last lines:", *[f"    {x}" for x in lines[-12:]])
    code = (
        FAILED
        if any(s in ("errors", "failed") for s in states)
        else INCONCLUSIVE
        if "inconclusive" in states
        else OK
    )
    return rep.result("; ".join(parts), code)


# ------------------------------------------------------------------------------------ runtime
def _runtime(what, a, rep: Report) -> int:
    device = "cpu" if a.rehearse else "cuda"
    log = rep.path + ".log"
    rc, secs = run(
        [PY, os.path.join(HERE, "gpu_runtime.py"), what, "--device", device], log, a.budget
    )
    text = tail(log, 10**6)
    rep(*text)
    # the combined runtime.txt of OUTDIR
    with open(os.path.join(os.path.dirname(rep.path), "runtime.txt"), "a") as f:
        f.write(f"== {what} ({device})\n" + "\n".join(text) + "\n")
    res = next((x[7:].strip() for x in reversed(text) if x.startswith("RESULT:")), "")
    if rc == "timeout":
        return rep.result(
            f"deadline reached; {sum(x.startswith(('PASS', 'FAIL')) for x in text)} checks done",
            OWN_DEADLINE,
        )
    if rc == NA:
        return rep.result(res or "no GPU", NA)
    return rep.result(res or f"exit code {rc}", OK if rc == 0 else FAILED)


def step_nccl(a, rep):
    return _runtime("nccl", a, rep)


def step_streams(a, rep):
    return _runtime("streams", a, rep)


# ------------------------------------------------------------------------------------ bench
def bench_plan(budget, providers):
    """(cases, the compile cases that fit, per-case timeout): what fits in the budget."""
    c = BENCH_COST_S
    fixed = 2 * c["start"] + c["start"] * len(providers)  # copy-bandwidth runs + process starts
    plain = sum(p != "compile" for p in providers) * len(BENCH_CASES) * c["case"]
    left = budget - fixed - plain
    compiled = []
    for case in BENCH_CASES:
        if "compile" in providers and left >= c["compile_case"]:
            compiled.append(case)
            left -= c["compile_case"]
    timeout = max(10, min(c["compile_case"] * 2, budget / 3))
    return BENCH_CASES, compiled, timeout


def linear_providers():
    """The linear benchmark's providers whose packages import here."""
    missing = {"trl": not have("trl"), "liger": not have("liger_kernel")}
    return [p for p in LINEAR_PROVIDERS if not missing.get(p)]


def bench_split(budget, providers):
    """(run.py's seconds, the linear benchmark's): run.py first, with at least RUN_PY_SHARE of the
    budget; the linear part wants a process start per provider (and the GEMM row) and a run of
    each, and gets 0 (skipped) when less than LINEAR_MIN_S would be left for it."""
    c = LINEAR_COST_S
    want = c["start"] * (len(providers) + 1) + c["provider"] * len(providers)
    first = max(budget * RUN_PY_SHARE, budget - want)
    if budget - first < LINEAR_MIN_S:
        return budget, 0
    return first, budget - first


def linear_cmd(out, rehearse, seconds, providers):
    """linear_bench.py's command: on the GPU at LINEAR_SIZE, rehearsed on the CPU at a tiny size;
    a provider gets at most a third of the time (at least 20 s), the whole run ``seconds``."""
    size = LINEAR_REHEARSAL_SIZE if rehearse else LINEAR_SIZE
    cmd = [PY, os.path.join(HERE, "linear_bench.py"), "--device", "cpu" if rehearse else "cuda"]
    cmd += ["--divergence", "jsd", "--soft-only", "--size", size]
    cmd += ["--providers", ",".join(providers), "--repeats", "1" if rehearse else "3"]
    cmd += ["--timeout", f"{max(20.0, seconds / 3):.0f}", "--deadline", f"{seconds:.0f}"]
    cmd += ["--out", os.path.join(out, "linear")]
    return cmd


def linear_result(out):
    """(rows of linear.json, one line on them, whether a kdfused provider failed)."""
    try:
        with open(os.path.join(out, "linear.json")) as f:
            rows = json.load(f)["rows"]
    except (OSError, ValueError, KeyError):
        return [], "no linear.json written", False
    timed = [r for r in rows if "ms" in r]
    other = [f"{r['provider']} {r.get('status', 'error')}" for r in rows if "ms" not in r]
    text = f"{len(timed)} of {len(rows)} providers timed" + (
        f" ({', '.join(other)})" if other else ""
    )
    losses = [r["loss"] for r in timed]
    if len(losses) > 1:
        spread = (max(losses) - min(losses)) / max(max(abs(x) for x in losses), 1e-30)
        text += f", losses agree to {spread:.1e} rel."
    ours_failed = any(
        r["provider"].startswith("kdfused") and r.get("status") == "error" for r in rows
    )
    return rows, text, ours_failed


def step_bench(a, rep: Report) -> int:
    t0 = time.monotonic()
    providers = ["kdfused", "eager", "compile"]
    providers += ["liger_kl", "liger_jsd"] if have("liger_kernel") else []
    lin_providers = linear_providers()
    first, lin_s = bench_split(a.budget, lin_providers)
    cases, compiled, timeout = bench_plan(first, providers)
    skip = [f"compile@{c}" for c in cases if c not in compiled]
    rep(
        f"providers: {', '.join(providers)}" + ("" if have("liger_kernel") else " (no Liger)"),
        f"cases: {', '.join(cases)}; compiled: {', '.join(compiled) or 'none'} "
        f"(compile skipped where it would not fit in {first:.0f} s)",
        f"per-case limit {timeout:.0f} s",
        f"budget {a.budget:.0f} s: run.py first, {first:.0f} s"
        + ("" if lin_s else " (too little for a share of the linear part)")
        + f"; then linear_bench.py ({', '.join(lin_providers)}) on what is left",
    )
    out = os.path.join(os.path.dirname(rep.path), "bench")
    if a.rehearse:  # the pipeline itself, on a tiny CPU case, with a skipped provider
        cmd = [PY, os.path.join(HERE, "run.py"), "--device", "cpu", "--sizes", "64x1000"]
        cmd += ["--providers", "kdfused,eager,compile", "--skip", "compile@64x1000"]
        cmd += ["--skip-reason", "skipped: would not fit in the budget", "--target-s", "0.05"]
        cmd += ["--min-reps", "2", "--out", out, "--tag", "bench", "--timeout", "60"]
        cmd += ["--deadline", f"{first - 10:.0f}"]
    else:
        cmd = [PY, os.path.join(HERE, "run.py"), "--device", "cuda", "--sizes", ",".join(cases)]
        cmd += ["--providers", ",".join(providers), "--target-s", "0.2", "--out", out]
        cmd += ["--tag", "bench", "--timeout", f"{timeout:.0f}", "--no-plot"]
        cmd += ["--deadline", f"{first - 10:.0f}"]  # results written even when time runs out
        if skip:
            cmd += ["--skip", ",".join(skip), "--skip-reason", "skipped: compile time over budget"]
    log = rep.path + ".log"
    rc, secs = run(cmd, log, first)
    rep(*tail(log, 40))
    try:
        with open(os.path.join(out, "bench.json")) as f:
            recs = json.load(f)["results"]
    except (OSError, ValueError, KeyError):
        recs = []
    timed = sum("fwdbwd" in r for r in recs)
    other = sorted({str(r.get("status"))[:40] for r in recs if "fwdbwd" not in r})
    text = f"{timed} of {len(recs)} runs timed" + (f"; others: {', '.join(other)}" if other else "")
    if a.rehearse:
        text = (
            f"tiny CPU run of the pipeline: {text}; on a GPU {len(cases)} cases x {len(providers)}"
        )
    code = OK if rc == 0 and timed else OWN_DEADLINE if rc == "timeout" else FAILED
    # the second part: the fused linear benchmark, on what is left of the budget
    left = a.budget - (time.monotonic() - t0) - 3
    if left < LINEAR_MIN_S:
        why = f"{max(0.0, left):.0f} s of the step's {a.budget:.0f} s left, it needs {LINEAR_MIN_S}"
        rep(f"linear benchmark skipped: {why}")
        text += f"; linear benchmark skipped ({why})"
    else:
        cmd = linear_cmd(out, a.rehearse, left - 2, lin_providers)
        lin_rc, lin_secs = run(cmd, log, left, append=True)
        lin_rows, lin_text, ours_failed = linear_result(out)
        rep(f"linear benchmark ({lin_secs:.0f} s of {left:.0f} s):", *tail(log, 12))
        where = f"CPU {LINEAR_REHEARSAL_SIZE}" if a.rehearse else f"N,H,V {LINEAR_SIZE}"
        text += f"; linear ({where}, soft JSD): {lin_text}"
        if lin_rc == "timeout":
            code = code if code != OK else OWN_DEADLINE
        elif lin_rc != 0 or not any("ms" in r for r in lin_rows) or ours_failed:
            code = FAILED
    if code == OWN_DEADLINE:
        return rep.result(f"deadline reached: {text}", OWN_DEADLINE)
    return rep.result(text, code)


STEPS = {
    "env": step_env,
    "files": step_files,
    "wheels": step_wheels,
    "build": step_build,
    "import": step_import,
    "selftest": step_selftest,
    "pytest": step_pytest,
    "sanitizer": step_sanitizer,
    "nccl": step_nccl,
    "streams": step_streams,
    "bench": step_bench,
}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["arch"]:
        print(gpu_arch())
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("step", choices=list(STEPS))
    ap.add_argument("report")
    ap.add_argument("--budget", type=float, default=120)
    ap.add_argument("--rehearse", action="store_true")
    a = ap.parse_args(argv)
    return STEPS[a.step](a, Report(a.report))


if __name__ == "__main__":
    sys.exit(main())
