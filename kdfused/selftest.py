"""Self-test of an installed kdfused: every compiled code path against float64 expected values.

Size: the runner, its table and its CLI; the cases and tolerances are in _selftest_cases.py.

    python -m kdfused.selftest                  # CPU paths, and the CUDA ones when a GPU is seen
    python -m kdfused.selftest --device cuda    # only the CUDA launch policies
    python -m kdfused.selftest --quick          # a third of the cases (seconds)
    python -m kdfused.selftest --seed 1234      # replay the random inputs of an earlier run

Code paths: the CPU kernel of every instruction set compiled into this build (``scalar`` runs
the same per-element device functions as the CUDA kernels), forced one by one; on a GPU every
launch policy (warp, block, cluster:2/4/8/16 on sm_90, two_phase:2/4/8), forced one by one
(only the automatic choice where this build cannot force one). Each path runs the same cases:
every divergence, every dtype and mixed student/teacher pair, V from 1 to 256000, odd V,
row-strided 16-bit views, 3-d inputs, ignored rows, masked (-inf) vocabulary, grad_output != 1,
teacher gradients, every reduction, loss-only calls; each is run twice (results must be bitwise
equal) and its inputs must come back unchanged. One more path per device (``cpu:linear``,
``cuda:linear``) runs the fused linear op (``kdfused.linear_kd_loss``: GEMMs + the fused kernel,
chunk by chunk) on its own small cases, with the same checks, against float64 values of the
materialised logits. The top-k op (``kdfused.topk_kd_loss``) runs on one path per compiled CPU
instruction set (``cpu:topk:<isa>``, forced as above: ``cpu:topk:scalar`` runs the CUDA top-k
kernel's per-element code) and one per GPU (``cuda:topk``), on its own cases: every allowed
(support, values, divergence), float32/bfloat16/float16/float64 students, V on both sides of
1024 (the CUDA kernel's warp-per-row and CTA-per-row variants), k = 1 and k = V, ``-inf``
padding (its index a duplicate of a valid one, or 0), a row without any valid entry, ignored
rows, the hard term, T != 1, the logit transforms, int32 indices, 3-d and strided students;
loss and student gradient with the same checks, against float64 values of
``kdfused.reference.topk_kd_loss``. Expected values and tolerances: see
``kdfused/_selftest_cases.py``. Inputs are random with a seed printed at the start.

Exit status: 0 every check passed; 1 something failed (the failures are listed); 2 nothing could
be tested (e.g. ``--device cuda`` without a GPU, or an unknown ``--paths`` name).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import time
from dataclasses import dataclass, field

import torch

import kdfused
from kdfused import _C
from kdfused import _selftest_cases as C

KD_LOSS = kdfused.kd_loss  # the function under test (the tests replace it to inject an error)
LINEAR = kdfused.linear_kd_loss  # the function the linear paths test
TOPK = kdfused.topk_kd_loss  # the function the top-k paths test
CUDA_PLANS = [
    "auto",
    "warp",
    "block",
    "cluster:2",
    "cluster:4",
    "cluster:8",
    "cluster:16",
    "two_phase:2",
    "two_phase:4",
    "two_phase:8",
]
OPTIONAL_PLANS = {"cluster:16"}  # non-portable cluster size: a device may refuse it
ERR_SHOW = 25  # failure lines printed


@dataclass
class Path:
    name: str
    device: str
    kind: str  # "isa", "plan", "env", "linear" or "topk"
    value: str  # the instruction set (isa; topk on the CPU) or the launch plan
    optional: bool = False  # may be refused by this machine without failing
    big: bool = True  # runs the large-vocabulary cases
    cases: int = 0
    refused: int = 0
    worst: float = 0.0
    worst_where: str = "-"
    seconds: float = 0.0
    failures: list = field(default_factory=list)
    plans_seen: set = field(default_factory=set)
    refusals: list = field(default_factory=list)
    fault: bool = False  # a CUDA fault: the process's CUDA context is unusable from here on
    status: str = ""

    def enter(self) -> None:
        if self.kind == "isa" or self.kind == "topk" and self.device == "cpu":
            _C.set_cpu_isa(self.value)
        elif self.kind == "plan":
            _C.set_cuda_plan(self.value)
        elif self.kind == "env":
            os.environ["KDFUSED_CUDA_NO_CLUSTERS"] = self.value

    def leave(self) -> None:
        with contextlib.suppress(Exception):
            if self.kind == "isa" or self.kind == "topk" and self.device == "cpu":
                _C.set_cpu_isa("auto")
            elif self.kind == "plan":
                _C.set_cuda_plan("auto")
            elif self.kind == "env":
                os.environ.pop("KDFUSED_CUDA_NO_CLUSTERS", None)


def cpu_paths() -> list:
    isas = kdfused.build_info()["cpu_isa_compiled"]
    return [Path(f"cpu:{isa}", "cpu", "isa", isa) for isa in isas]


def cuda_paths() -> list:
    major, _ = torch.cuda.get_device_capability()
    if not hasattr(_C, "set_cuda_plan"):  # a build that cannot force a launch policy
        return [Path("cuda:auto", "cuda", "none", ""), Path("cuda:no-clusters", "cuda", "env", "1")]
    paths = []
    for plan in CUDA_PLANS:
        if plan.startswith("cluster") and major < 9:
            continue  # thread-block clusters need sm_90
        paths.append(
            Path(
                f"cuda:{plan}",
                "cuda",
                "plan",
                plan,
                optional=plan in OPTIONAL_PLANS,
                big=plan != "warp",
            )
        )
    return paths


def linear_path(device: str) -> Path:
    return Path(f"{device}:linear", device, "linear", "")


def topk_paths(device: str) -> list:
    """kdfused.topk_kd_loss: one path per compiled instruction set on the CPU (``cpu:topk:<isa>``),
    one on CUDA (``cuda:topk``: its kernel picks a warp or a CTA per row from V)."""
    if device == "cuda":
        return [Path("cuda:topk", "cuda", "topk", "")]
    isas = kdfused.build_info()["cpu_isa_compiled"]
    return [Path(f"cpu:topk:{isa}", "cpu", "topk", isa) for isa in isas]


def plan_mismatch(forced: str, seen: str):
    """Why last_cuda_plan() does not describe the forced plan (None when it does)."""
    norm = seen.lower().replace("-", "").replace("_", "").replace(" ", "")
    kind, _, n = forced.partition(":")
    want = {"warp": "warp", "block": "block", "cluster": "cluster", "two_phase": "twophase"}[kind]
    if want not in norm or (kind == "block" and ("cluster" in norm or "twophase" in norm)):
        return f"forced {forced!r} but the launch was {seen!r}"
    if n and "split=" in norm and f"split={n}" not in norm:
        return f"forced {forced!r} but the launch was {seen!r}"
    return None


def _is_cuda_fault(exc: BaseException) -> bool:
    text = str(exc)
    return any(
        w in text
        for w in (
            "CUDA error",
            "illegal",
            "device-side",
            "CUDA kernel errors",
            "misaligned",
            "out of memory",
        )
    )


def _loss_options(case) -> dict:
    """The case's loss options, as keywords of the functions under test."""
    names = ("temperature", "soft_weight", "hard_weight", "divergence", "beta", "ignore_index")
    return {n: getattr(case, n) for n in names + ("reduction",)} | C.transform_options(case)


def _judge(checks, exp, runs, names, label: str, msgs: list) -> tuple:
    """(worst error/tolerance, where) of ``checks`` ((name, result) pairs) against ``exp``; adds
    to ``msgs`` each result out of tolerance and each that differs between the two ``runs``."""
    worst, where = 0.0, "-"
    for name, got in checks:
        r = C.error_ratio(got, exp[name], exp[name + "_tol"])
        if not r <= 1.0:
            msgs.append(f"{name}: error {r:.3g} x tolerance")
        if not r <= worst:  # NaN-safe
            worst, where = r, f"{label} {name}"
    for a, b, name in zip(runs[0], runs[1], names):
        if (a is None) != (b is None) or (a is not None and not torch.equal(a, b)):
            msgs.append(f"{name} differs between two identical calls (not deterministic)")
    return worst, where


def _judge_runs(case, runs, grads, exp, label: str, msgs: list) -> tuple:
    """:func:`_judge` of the first run's loss and gradients, after their dtypes: the loss in the
    accumulation dtype, each gradient in ``grads`` ((name, expected dtype) pairs in the order of
    the runs' entries after the loss; dtype None: not checked) in its own."""
    acc = C.F64 if C.F64 in (case.sdt, case.tdt) else C.F32
    loss = runs[0][0]
    if loss.dtype != acc:
        msgs.append(f"loss dtype {loss.dtype}, expected {acc}")
    checks = [("loss", loss)]
    for (name, dtype), got in zip(grads, runs[0][1:]):
        if dtype is None:
            continue
        checks.append((name, got))
        if got is not None and got.dtype != dtype:
            msgs.append(f"{name} dtype {got.dtype}, expected {dtype}")
    names = ("loss",) + tuple(name for name, _ in grads)
    return _judge(checks, exp, runs, names, label, msgs)


def run_case(path: Path, case: C.Case, inp: dict, exp: dict) -> tuple:
    """(worst error/tolerance, where, [failure messages]); raises on an error in the call."""
    s, t, y, go = C.on_device(inp, case, path.device)
    s0, t0 = s.clone(), t.clone()
    kw = _loss_options(case)
    if case.divergence != "jsd":
        del kw["beta"]  # the default
    runs = []
    for _ in range(2):
        ss = s.detach().requires_grad_(not case.loss_only)
        tt = t.detach().requires_grad_(case.teacher_grad and not case.loss_only)
        with torch.no_grad() if case.loss_only else contextlib.nullcontext():
            loss = KD_LOSS(ss, tt, y, **kw)
        if path.kind == "plan":
            seen = _C.last_cuda_plan()
            path.plans_seen.add(seen)
        if not case.loss_only:
            loss.backward(go.to(loss.dtype))
        runs.append((loss.detach(), ss.grad, tt.grad))
    msgs = []
    if path.kind == "plan" and path.value != "auto":
        why = plan_mismatch(path.value, seen)
        if why:
            msgs.append(why)
    grads = (
        ("grad_s", None if case.loss_only else case.sdt),
        ("grad_t", case.tdt if case.teacher_grad and not case.loss_only else None),
    )
    worst, where = _judge_runs(case, runs, grads, exp, f"#{case.idx}", msgs)
    if not (torch.equal(s, s0) and torch.equal(t, t0)):
        msgs.append("the inputs were modified")
    return worst, where, msgs


def run_linear_case(path: Path, case: C.LinearCase, inp: dict, exp: dict) -> tuple:
    """As run_case, for the fused linear op: (worst error/tolerance, where, [failure messages])."""
    x = C.linear_on_device(inp, path.device)
    x0 = {k: v.clone() for k, v in x.items() if v is not None}
    kw = dict(_loss_options(case), chunk_size=case.chunk_size)
    runs = []
    for _ in range(2):
        sh, sw, sb = (
            x[k].detach().requires_grad_(not case.loss_only) if x[k] is not None else None
            for k in ("sh", "sw", "sb")
        )
        with torch.no_grad() if case.loss_only else contextlib.nullcontext():
            loss = LINEAR(
                sh,
                sw,
                x["th"],
                x["tw"],
                x["y"],
                student_bias=sb,
                teacher_bias=x["tb"],
                teacher_logits=x["tl"],
                **kw,
            )
        if not case.loss_only:
            loss.backward(x["go"].to(loss.dtype))
        runs.append((loss.detach(), sh.grad, sw.grad, sb.grad if sb is not None else None))
    msgs = []
    grads = tuple(
        (name, None if case.loss_only or name not in exp else case.sdt)  # (no bias: no grad_b)
        for name in ("grad_h", "grad_w", "grad_b")
    )
    worst, where = _judge_runs(case, runs, grads, exp, f"linear#{case.idx}", msgs)
    if not all(torch.equal(x[k], v) for k, v in x0.items()):
        msgs.append("the inputs were modified")
    return worst, where, msgs


def run_topk_case(path: Path, case: C.TopKCase, inp: dict, exp: dict) -> tuple:
    """As run_case, for the top-k op: (worst error/tolerance, where, [failure messages])."""
    s, idx, val, y, go = C.topk_on_device(inp, case, path.device)
    x0 = [x.clone() for x in (s, idx, val)]
    kw = C.topk_options(case)
    runs = []
    for _ in range(2):
        ss = s.detach().requires_grad_(not case.loss_only)
        with torch.no_grad() if case.loss_only else contextlib.nullcontext():
            loss = TOPK(ss, idx, val, y, **kw)
        if not case.loss_only:
            loss.backward(go.to(loss.dtype))
        runs.append((loss.detach(), ss.grad))
    msgs = []
    grads = (("grad_s", None if case.loss_only else case.sdt),)
    worst, where = _judge_runs(case, runs, grads, exp, f"topk#{case.idx}", msgs)
    if not all(torch.equal(a, b) for a, b in zip((s, idx, val), x0)):
        msgs.append("the inputs were modified")
    return worst, where, msgs


RUNNERS = {"linear": run_linear_case, "topk": run_topk_case}  # the others: run_case
LABELS = {"linear": "linear#", "topk": "topk#"}  # how a path's cases are named: "#" for kd_loss


def run_path(path: Path, cases: list, inputs: dict, exps: dict) -> None:
    t0 = time.perf_counter()
    run = RUNNERS.get(path.kind, run_case)
    try:
        path.enter()
    except Exception as exc:  # noqa: BLE001 - reported as the path's result
        path.status = (
            f"n/a: {exc}"
            if path.optional or isinstance(exc, ValueError) and path.device == "cpu"
            else "FAIL"
        )
        if path.status == "FAIL":
            path.failures.append(f"{path.name}: cannot be selected: {exc}")
        return
    try:
        for case in cases:
            if case.big and not path.big:
                continue
            path.cases += 1
            try:
                worst, where, msgs = run(path, case, inputs[case.idx], exps[case.idx])
            except Exception as exc:  # noqa: BLE001
                if (
                    path.kind == "plan"
                    and isinstance(exc, RuntimeError)
                    and not _is_cuda_fault(exc)
                ):
                    path.refused += 1  # the forced plan cannot run this case: said, not failed
                    path.refusals.append(f"#{case.idx}: {str(exc).splitlines()[0][:100]}")
                    continue
                where = f"{LABELS.get(path.kind, '#')}{case.idx} call"
                worst = math.inf
                msgs = [
                    f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
                    if str(exc)
                    else type(exc).__name__
                ]
                path.fault = (
                    path.fault
                    or (path.device == "cuda" and _is_cuda_fault(exc))
                    and "out of memory" not in str(exc)
                )
            if not worst <= path.worst:
                path.worst, path.worst_where = worst, where
            path.failures += [f"{path.name} {case.describe()}: {m}" for m in msgs]
            if path.fault:
                path.failures.append(
                    f"{path.name}: stopped after a CUDA fault (run the "
                    "sanitizers, or this path alone with --paths)"
                )
                break
        if path.device == "cuda":
            torch.cuda.synchronize()
    except Exception as exc:  # noqa: BLE001 - e.g. a fault surfacing at the synchronize
        path.failures.append(f"{path.name}: {type(exc).__name__}: {exc}")
        path.fault = path.fault or (path.device == "cuda" and _is_cuda_fault(exc))
    finally:
        path.leave()
        path.seconds = time.perf_counter() - t0
    if path.refused == path.cases and path.cases:
        if path.optional:
            path.status = "n/a: refused every case on this device"
            return
        path.failures.append(f"{path.name}: the forced plan refused every case")
    path.status = "FAIL" if path.failures else "PASS"


def supported_divergences(wanted: list) -> tuple:
    ok, missing = [], []
    s, t = torch.randn(2, 5), torch.randn(2, 5)
    for d in wanted:
        try:
            KD_LOSS(s, t, divergence=d, **({"beta": 0.5} if d == "jsd" else {}))
            ok.append(d)
        except (ValueError, TypeError) as exc:
            missing.append(f"divergence {d!r} is not supported by this build: {exc}")
    return ok, missing


def table(paths: list) -> str:
    head = ["path", "cases", "refused", "max err/tol", "where", "time s", "result"]
    rows = [
        [
            p.name,
            str(p.cases),
            str(p.refused),
            f"{p.worst:.3g}",
            p.worst_where,
            f"{p.seconds:.1f}",
            p.status,
        ]
        for p in paths
    ]
    w = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
    fmt = lambda r: "  ".join(x.ljust(n) for x, n in zip(r, w)).rstrip()  # noqa: E731
    return "\n".join([fmt(head), fmt(["-" * n for n in w])] + [fmt(r) for r in rows])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m kdfused.selftest", description=__doc__.split("\n")[0]
    )
    ap.add_argument("--device", choices=["cpu", "cuda", "all"], default="all")
    ap.add_argument("--quick", action="store_true", help="a third of the cases")
    ap.add_argument(
        "--divergences",
        default=",".join(C.DIVERGENCES),
        help=f"comma list (default: {','.join(C.DIVERGENCES)})",
    )
    ap.add_argument("--seed", type=int, help="replay the inputs of an earlier run")
    ap.add_argument("--paths", help="comma list of path names to run, e.g. cpu:scalar,cuda:warp")
    ap.add_argument(
        "--list",
        action="store_true",
        help="print the paths and case counts that would run, run nothing (without a GPU, "
        "--device cuda lists the paths of an sm_90 GPU)",
    )
    args = ap.parse_args(argv)
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "little") >> 1
    divs = [d.strip() for d in args.divergences.split(",") if d.strip()]
    bad = [d for d in divs if d not in C.DIVERGENCES]
    if bad:
        ap.error(f"unknown divergence(s) {bad}; choose from {','.join(C.DIVERGENCES)}")
    info = kdfused.build_info()
    cuda_ok = torch.cuda.is_available() and bool(info.get("cuda"))
    notes, paths = [], []
    if args.device in ("cpu", "all"):
        paths += cpu_paths() + [linear_path("cpu")] + topk_paths("cpu")
        if "scalar" not in info["cpu_isa_compiled"]:
            notes.append("this build has no 'scalar' CPU path (the CUDA per-element functions)")
    if args.device in ("cuda", "all"):
        if args.list and not cuda_ok:  # what an sm_90 GPU would run
            paths += [
                Path(f"cuda:{plan}", "cuda", "plan", plan, optional=plan in OPTIONAL_PLANS)
                for plan in CUDA_PLANS
            ]
            paths += [linear_path("cuda")] + topk_paths("cuda")
            notes.append("no GPU here: the CUDA paths listed are those of an sm_90 GPU")
        elif cuda_ok:
            paths += cuda_paths() + [linear_path("cuda")] + topk_paths("cuda")
            if not hasattr(_C, "set_cuda_plan"):
                notes.append(
                    "this build cannot force a CUDA launch policy (no set_cuda_plan): "
                    "only the automatic choice, with and without clusters, is checked"
                )
        else:
            why = (
                "torch sees no CUDA device"
                if not torch.cuda.is_available()
                else "this kdfused build has no CUDA kernels"
            )
            if args.device == "cuda":
                print(f"kdfused self-test: nothing to test on cuda: {why}")
                return 2
            notes.append(f"CUDA paths not checked: {why}")
    if args.paths:
        wanted = [p.strip() for p in args.paths.split(",") if p.strip()]
        unknown = [w for w in wanted if w not in {p.name for p in paths}]
        if unknown:
            print(
                f"kdfused self-test: unknown path(s) {unknown}; this machine has "
                f"{', '.join(p.name for p in paths)}"
            )
            return 2
        paths = [p for p in paths if p.name in wanted]
    divs, build_failures = supported_divergences(divs)
    if args.list:
        n_cases = len(C.make_cases(divs, quick=args.quick))
        n_of = {
            "linear": len(C.make_linear_cases(divs, quick=args.quick)),
            "topk": len(C.make_topk_cases(divs, quick=args.quick)),
        }
        for p in paths:
            print(f"{p.name}\t{n_of.get(p.kind, n_cases)} cases")
        for n in notes:
            print(f"note: {n}")
        print(
            f"{len(paths)} paths, divergences {','.join(divs)}" + (" (quick)" if args.quick else "")
        )
        return 0 if paths else 2

    replay = (
        f"python -m kdfused.selftest --seed {seed} --device {args.device}"
        + (" --quick" if args.quick else "")
        + f" --divergences {args.divergences}"
    )
    print(f"kdfused self-test  seed {seed}  (replay: {replay})")
    dev = f", {torch.cuda.get_device_name()}" if cuda_ok else ""
    print(f"torch {torch.__version__}, kdfused {kdfused.__version__}, build {info}{dev}")
    t0 = time.perf_counter()
    cases = C.make_cases(divs, quick=args.quick)
    inputs = {c.idx: C.make_inputs(c, seed) for c in cases}
    exps = {c.idx: C.expected(c, inputs[c.idx]) for c in cases}
    lcases = C.make_linear_cases(divs, quick=args.quick)
    linputs = {c.idx: C.make_linear_inputs(c, seed) for c in lcases}
    lexps = {c.idx: C.linear_expected(c, linputs[c.idx]) for c in lcases}
    kcases = C.make_topk_cases(divs, quick=args.quick)
    kinputs = {c.idx: C.make_topk_inputs(c, seed) for c in kcases}
    kexps = {c.idx: C.topk_expected(c, kinputs[c.idx]) for c in kcases}
    print(
        f"{len(cases)} cases (+{len(lcases)} linear, +{len(kcases)} top-k), float64 expected "
        "values in "
        f"{time.perf_counter() - t0:.1f} s; paths: {', '.join(p.name for p in paths)}",
        flush=True,
    )
    lost = None  # the path whose CUDA fault left the CUDA context unusable
    for p in paths:
        if lost and p.device == "cuda":
            p.status = "not run"
            p.failures.append(f"{p.name}: not run, the CUDA context was lost in {lost}")
            continue
        if p.kind == "linear":
            run_path(p, lcases, linputs, lexps)
        elif p.kind == "topk":
            run_path(p, kcases, kinputs, kexps)
        else:
            run_path(p, cases, inputs, exps)
        lost = lost or (p.name if p.fault else None)
        print(f"  {p.name}: {p.status} ({p.cases} cases, {p.seconds:.1f} s)", flush=True)
    print()
    print(table(paths))
    for p in paths:
        if p.kind == "plan" and p.plans_seen:
            print(f"{p.name} launched: {'; '.join(sorted(p.plans_seen))}")
        if p.refusals:
            more = f" (+{len(p.refusals) - 3} more)" if len(p.refusals) > 3 else ""
            print(f"{p.name} refused {len(p.refusals)} case(s): {'; '.join(p.refusals[:3])}{more}")
    failures = build_failures + [f for p in paths for f in p.failures]
    for n in notes:
        print(f"note: {n}")
    for f in failures[:ERR_SHOW]:
        print(f"FAIL {f}")
    if len(failures) > ERR_SHOW:
        print(f"... and {len(failures) - ERR_SHOW} more failures")
    ran = [p for p in paths if p.status in ("PASS", "FAIL")]
    total = time.perf_counter() - t0
    if failures or not ran:
        why = f"{len(failures)} failure(s)" if failures else "no path could run"
        print(f"kdfused self-test FAILED: {why}; {len(ran)} paths, {total:.1f} s, seed {seed}")
        return 1
    n_lin = sum(p.kind == "linear" for p in ran)
    n_topk = sum(p.kind == "topk" for p in ran)
    print(
        f"kdfused self-test PASSED: {len(ran)} paths ({len(ran) - n_lin - n_topk} x {len(cases)} "
        f"cases, {n_lin} linear x {len(lcases)} cases, {n_topk} top-k x {len(kcases)} cases), "
        f"{total:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
