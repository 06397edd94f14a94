"""``python -m kdfused.selftest``: passes on this machine's CPU paths, lists every compiled
instruction set, and fails when a result is wrong (its checks can fail)."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

import kdfused
from kdfused import _selftest_cases as C
from kdfused import selftest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ISAS = kdfused.build_info()["cpu_isa_compiled"]
TOPK_ISA = "scalar" if "scalar" in ISAS else ISAS[0]  # the CUDA kernel's per-element code
# Divergences this build accepts; the others must make the self-test fail (tested below).
SUPPORTED, _ = selftest.supported_divergences(list(C.DIVERGENCES))
UNSUPPORTED = [d for d in C.DIVERGENCES if d not in SUPPORTED]


def _run(*args, timeout=120):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run(
        [sys.executable, "-m", "kdfused.selftest", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_quick_cpu_selftest_passes_and_lists_every_isa():
    args = ["--device", "cpu", "--quick"]
    if UNSUPPORTED:
        args += ["--divergences", ",".join(SUPPORTED)]
    r = _run(*args)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    table = [x.split()[0] for x in r.stdout.splitlines() if x.startswith("cpu:")]
    for isa in ISAS:
        assert f"cpu:{isa}" in table, f"{isa} missing from the table:\n{r.stdout}"
        assert f"cpu:topk:{isa}" in table, f"top-k on {isa} missing from the table:\n{r.stdout}"
    assert "cpu:linear" in table
    assert "kdfused self-test PASSED" in r.stdout
    assert "seed" in r.stdout.splitlines()[0]


@pytest.mark.skipif(not UNSUPPORTED, reason="this build supports every divergence")
def test_a_divergence_the_build_lacks_is_a_failure(capsys):
    rc = selftest.main(
        [
            "--device",
            "cpu",
            "--quick",
            "--paths",
            f"cpu:{ISAS[0]}",
            "--divergences",
            ",".join([SUPPORTED[0]] + UNSUPPORTED[:1]),
        ]
    )
    out = capsys.readouterr().out
    assert rc == 1 and "not supported by this build" in out, out


def test_cuda_without_a_gpu_is_nothing_to_test(capsys):
    if torch.cuda.is_available() and kdfused.build_info()["cuda"]:
        pytest.skip("this machine has a GPU")
    assert selftest.main(["--device", "cuda"]) == 2
    assert "nothing to test" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="lists the paths of a GPU-less machine")
def test_list_names_the_paths_of_a_gpu_without_running(capsys):
    assert selftest.main(["--device", "cuda", "--list", "--quick"]) == 0
    out = capsys.readouterr().out
    names = [x.split()[0] for x in out.splitlines() if x.startswith("cuda:")]
    assert names == [f"cuda:{p}" for p in selftest.CUDA_PLANS] + ["cuda:linear", "cuda:topk"]
    assert "sm_90" in out and "seed" not in out  # nothing ran
    assert selftest.main(["--device", "cuda", "--list", "--paths", "cuda:block,cuda:x"]) == 2


def test_error_ratio_sees_a_perturbation():
    exp = torch.linspace(-1, 1, 101, dtype=torch.float64)
    tol = C.tol(exp, torch.float32, torch.float32, 1e-6)
    got = exp.float()
    assert C.error_ratio(got, exp, tol) <= 1
    bad = got.clone()
    bad[17] *= 1 + 1e-4
    assert C.error_ratio(bad, exp, tol) > 1
    bad[17] = float("nan")
    assert C.error_ratio(bad, exp, tol) == math.inf
    assert C.error_ratio(got[:-1], exp, tol) == math.inf
    assert C.error_ratio(None, exp, tol) == math.inf  # a missing, nonzero gradient
    assert C.error_ratio(None, torch.zeros(3, dtype=torch.float64), tol[:3]) == 0.0


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; the gradient flowing back is scaled (a wrong gradient, right loss)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g * 1.05


def _wrong_loss(s, t, y=None, **kw):
    return kdfused.kd_loss(s, t, y, **kw) * (1 + 1e-3)


def _wrong_grad(s, t, y=None, **kw):
    return kdfused.kd_loss(_ScaleGrad.apply(s), t, y, **kw)


def _nondeterministic(s, t, y=None, **kw):
    loss = kdfused.kd_loss(s, t, y, **kw)
    _nondeterministic.calls = getattr(_nondeterministic, "calls", 0) + 1
    return loss + (_nondeterministic.calls % 2) * 1e-12


def _wrong_topk_loss(s, i, v, y=None, **kw):
    return kdfused.topk_kd_loss(s, i, v, y, **kw) * (1 + 1e-3)


def _wrong_topk_grad(s, i, v, y=None, **kw):
    return kdfused.topk_kd_loss(_ScaleGrad.apply(s), i, v, y, **kw)


def _nondeterministic_topk(s, i, v, y=None, **kw):
    loss = kdfused.topk_kd_loss(s, i, v, y, **kw)
    _nondeterministic_topk.calls = getattr(_nondeterministic_topk, "calls", 0) + 1
    return loss + (_nondeterministic_topk.calls % 2) * 1e-12


def _topk_as_renormalized(s, i, v, y=None, **kw):
    """A kernel that ignores the tail bucket (the loss of support="renormalized")."""
    if kw["support"] == "tail":
        kw["support"] = "renormalized"
    return kdfused.topk_kd_loss(s, i, v, y, **kw)


@pytest.mark.parametrize(
    "target, path, wrong, message",
    [
        ("KD_LOSS", f"cpu:{ISAS[0]}", _wrong_loss, "loss: error"),
        ("KD_LOSS", f"cpu:{ISAS[0]}", _wrong_grad, "grad_s: error"),
        ("KD_LOSS", f"cpu:{ISAS[0]}", _nondeterministic, "not deterministic"),
        ("TOPK", f"cpu:topk:{TOPK_ISA}", _wrong_topk_loss, "loss: error"),
        ("TOPK", f"cpu:topk:{TOPK_ISA}", _wrong_topk_grad, "grad_s: error"),
        ("TOPK", f"cpu:topk:{TOPK_ISA}", _nondeterministic_topk, "not deterministic"),
        ("TOPK", f"cpu:topk:{TOPK_ISA}", _topk_as_renormalized, "tail logprobs"),
    ],
)
def test_a_wrong_result_fails_the_selftest(monkeypatch, capsys, target, path, wrong, message):
    """Each path's checks can fail: a wrong loss, a wrong gradient, a result that changes
    between two calls, a top-k kernel without the tail bucket (--quick with kl,ce has a tail
    case)."""
    monkeypatch.setattr(selftest, target, wrong)
    rc = selftest.main(
        [
            "--device",
            "cpu",
            "--quick",
            "--paths",
            path,
            "--divergences",
            "kl,ce" if target == "TOPK" else SUPPORTED[0],
            "--seed",
            "7",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 1, out
    assert message in out and "kdfused self-test FAILED" in out


def test_topk_cases_cover_the_conventions():
    """Every allowed (support, values, divergence) once; both CUDA kernels (a warp per row up to
    V = 1024, a CTA above); float32, bfloat16 and float64 students; padding, a row without any
    valid entry that is not ignored, an ignored row; T != 1, the hard term, the student's
    transform; --quick keeps both kernels, every support and the hard term."""
    from kdfused._checks import TOPK_DIVERGENCES

    cases = C.make_topk_cases(list(C.DIVERGENCES))
    got = sorted((c.support, c.values, c.divergence) for c in cases)
    assert got == sorted(C.topk_combos(C.DIVERGENCES)) and len(got) == len(set(got))
    assert {"full", "renormalized", "tail"} == {c.support for c in cases}
    assert all(c.divergence in TOPK_DIVERGENCES for c in cases if c.support == "full")
    assert all(c.values == "logprobs" for c in cases if c.support == "tail")
    assert {C.F32, C.BF16, C.F64} <= {c.sdt for c in cases}
    for quick in (False, True):
        cs = C.make_topk_cases(list(C.DIVERGENCES), quick=quick)
        assert min(c.V for c in cs) <= 1024 < max(c.V for c in cs), quick
        assert {c.support for c in cs} == {"full", "renormalized", "tail"}, quick
        assert any(c.hard_weight > 0 for c in cs) and any(c.temperature != 1 for c in cs)
        assert any(c.transform != C.TRANSFORMS[0] for c in cs)
    c = next(c for c in cases if c.padded and c.labels and c.hard_weight > 0)
    inp = C.make_topk_inputs(c, 3)
    val, idx, y = inp["val"], inp["idx"], inp["y"].reshape(-1)
    none_valid = (val == -math.inf).all(-1)
    assert none_valid.any() and (y[none_valid] != c.ignore_index).all()  # only its hard term
    assert (y == c.ignore_index).any()
    padded = (val == -math.inf).any(-1) & ~none_valid
    assert padded.sum() >= 2
    r = int(padded.nonzero()[0])  # its padding repeats a valid index
    assert idx[r, -1] in idx[r][val[r] != -math.inf]
    s, _, _, _, _ = C.topk_on_device(C.make_topk_inputs(cases[1], 3), cases[1], "cpu")
    assert cases[1].strided and not s.is_contiguous()


def test_topk_paths_select_their_instruction_set(monkeypatch):
    """A cpu:topk:<isa> path runs top-k on that instruction set (the scalar one included), and
    gives the automatic choice back after; an instruction set this CPU lacks is "n/a"."""
    seen = []

    def spy(*args, **kw):
        seen.append(kdfused.build_info()["cpu_isa"])
        return kdfused.topk_kd_loss(*args, **kw)

    monkeypatch.setattr(selftest, "TOPK", spy)
    auto = kdfused.build_info()["cpu_isa"]
    cases = C.make_topk_cases(["kl"], quick=True)[:1]
    inputs = {c.idx: C.make_topk_inputs(c, 5) for c in cases}
    exps = {c.idx: C.topk_expected(c, inputs[c.idx]) for c in cases}
    paths = selftest.topk_paths("cpu")
    assert [p.name for p in paths] == [f"cpu:topk:{isa}" for isa in ISAS]
    for path in paths:
        seen.clear()
        selftest.run_path(path, cases, inputs, exps)
        if path.status.startswith("n/a"):
            continue  # compiled, but this CPU lacks it
        assert path.status == "PASS", path.failures
        assert seen and set(seen) == {path.value}
        assert kdfused.build_info()["cpu_isa"] == auto
    missing = selftest.Path("cpu:topk:sse9", "cpu", "topk", "sse9")
    selftest.run_path(missing, cases, inputs, exps)
    assert missing.status.startswith("n/a") and not missing.failures


def test_strided_cases_really_are_strided():
    cases = [c for c in C.make_cases(["kl"]) if c.strided and (c.sdt in C.HALF)]
    assert cases
    for c in cases:
        s, t, _, _ = C.on_device(C.make_inputs(c, 3), c, "cpu")
        assert not s.is_contiguous() and not t.is_contiguous()
        assert s.shape == (*c.lead, c.V) and s.dtype == c.sdt


def test_expected_values_agree_with_the_reference_for_kl_and_ce():
    """The self-test's own float64 formulas against kdfused.reference on a few cases (the logit
    transforms among them)."""
    cases = C.make_cases(["kl", "ce"], quick=True)[:6]
    assert any(c.transform != C.TRANSFORMS[0] for c in cases)
    for c in cases:
        inp = C.make_inputs(c, 11)
        exp = C.expected(c, inp)
        s, t, y, go = C.on_device(inp, c, "cpu")
        s, t = s.double().requires_grad_(), t.double().requires_grad_()
        kw = dict(
            temperature=c.temperature,
            soft_weight=c.soft_weight,
            hard_weight=c.hard_weight,
            divergence=c.divergence,
            ignore_index=c.ignore_index,
            reduction=c.reduction,
            **C.transform_options(c),
        )
        loss = kdfused.reference.kd_loss(s, t, y, **kw)
        assert C.error_ratio(loss, exp["loss"], exp["loss_tol"]) <= 1e-3, c.describe()
        if not c.loss_only:
            (loss * go).sum().backward()
            assert C.error_ratio(s.grad, exp["grad_s"], exp["grad_s_tol"]) <= 1e-3


# --------------------------------------------------------------------------- forced CUDA plans
# The plan logic runs here on the CPU with stand-ins for set_cuda_plan/last_cuda_plan, so that
# it is known to work before a GPU run.


@pytest.mark.parametrize(
    "forced, seen, ok",
    [
        ("warp", "warp", True),
        ("block", "block split=1 stage", True),
        ("block", "block split=8 cluster stage", False),
        ("cluster:4", "block split=4 cluster stage", True),
        ("cluster:4", "block split=8 cluster stage", False),
        ("cluster:8", "warp", False),
        ("two_phase:2", "block split=2 two-phase", True),
        ("two_phase:4", "two_phase split=2", False),
    ],
)
def test_plan_mismatch(forced, seen, ok):
    assert (selftest.plan_mismatch(forced, seen) is None) == ok


def _fake_plans(monkeypatch, launch, kd=None):
    state = {"plan": "auto"}
    monkeypatch.setattr(selftest._C, "set_cuda_plan", lambda p: state.update(plan=p), raising=False)
    monkeypatch.setattr(selftest._C, "last_cuda_plan", lambda: launch(state["plan"]), raising=False)
    if kd is not None:
        monkeypatch.setattr(selftest, "KD_LOSS", kd)


def _plan_path(plan, optional=False):
    return selftest.Path(f"fake:{plan}", "cpu", "plan", plan, optional=optional)


def _cases():
    cases = C.make_cases([SUPPORTED[0]], quick=True)
    inputs = {c.idx: C.make_inputs(c, 5) for c in cases}
    return cases, inputs, {c.idx: C.expected(c, inputs[c.idx]) for c in cases}


def test_forced_plan_that_launches_is_checked(monkeypatch):
    cases, inputs, exps = _cases()
    _fake_plans(monkeypatch, lambda p: f"block split={p.split(':')[1]} cluster stage")
    good = _plan_path("cluster:4")
    selftest.run_path(good, cases, inputs, exps)
    assert good.status == "PASS" and good.cases == len(cases), good.failures
    _fake_plans(monkeypatch, lambda p: "warp")  # the forced plan was not the one launched
    bad = _plan_path("cluster:4")
    selftest.run_path(bad, cases, inputs, exps)
    assert bad.status == "FAIL" and "forced 'cluster:4'" in bad.failures[0]


def _refuse(*a, **k):
    raise RuntimeError("kdfused: launch plan 'cluster:16' cannot run on this device")


def _fault(*a, **k):
    raise RuntimeError("CUDA error: an illegal memory access was encountered")


@pytest.mark.parametrize(
    "kd, optional, status",
    [(_refuse, True, "n/a"), (_refuse, False, "FAIL"), (_fault, True, "FAIL")],
)
def test_refused_plans(monkeypatch, kd, optional, status):
    cases, inputs, exps = _cases()
    _fake_plans(monkeypatch, lambda p: "block split=16 cluster", kd)
    path = _plan_path("cluster:16", optional=optional)
    selftest.run_path(path, cases, inputs, exps)
    assert path.status.startswith(status), (path.status, path.failures)


def test_a_cuda_fault_stops_the_cuda_paths(monkeypatch):
    cases, inputs, exps = _cases()
    _fake_plans(monkeypatch, lambda p: "warp", _fault)
    path = selftest.Path("fake:warp", "cuda", "plan", "warp")
    on_cpu = C.on_device
    monkeypatch.setattr(C, "on_device", lambda inp, case, device: on_cpu(inp, case, "cpu"))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    selftest.run_path(path, cases, inputs, exps)
    assert path.fault and path.cases == 1 and path.status == "FAIL"
    assert "stopped after a CUDA fault" in path.failures[-1]
