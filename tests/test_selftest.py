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
# Divergences this build accepts; the others must make the self-test fail (tested below).
SUPPORTED, UNSUPPORTED = selftest.supported_divergences(list(C.DIVERGENCES))


def _run(*args, timeout=120):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "kdfused.selftest", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_quick_cpu_selftest_passes_and_lists_every_isa():
    args = ["--device", "cpu", "--quick"]
    if UNSUPPORTED:
        args += ["--divergences", ",".join(SUPPORTED)]
    r = _run(*args)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    table = [x.split()[0] for x in r.stdout.splitlines() if x.startswith("cpu:")]
    for isa in ISAS:
        assert f"cpu:{isa}" in table, f"{isa} missing from the table:\n{r.stdout}"
    assert "kdfused self-test PASSED" in r.stdout
    assert "seed" in r.stdout.splitlines()[0]


@pytest.mark.skipif(not UNSUPPORTED, reason="this build supports every divergence")
def test_a_divergence_the_build_lacks_is_a_failure():
    r = _run("--device", "cpu", "--quick", "--paths", f"cpu:{ISAS[0]}")
    assert r.returncode == 1
    assert "not supported by this build" in r.stdout


def test_cuda_without_a_gpu_is_nothing_to_test():
    if torch.cuda.is_available() and kdfused.build_info()["cuda"]:
        pytest.skip("this machine has a GPU")
    r = _run("--device", "cuda")
    assert r.returncode == 2 and "nothing to test" in r.stdout


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


@pytest.mark.parametrize("wrong, message", [(_wrong_loss, "loss: error"),
                                            (_wrong_grad, "grad_s: error"),
                                            (_nondeterministic, "not deterministic")])
def test_a_wrong_result_fails_the_selftest(monkeypatch, capsys, wrong, message):
    monkeypatch.setattr(selftest, "KD_LOSS", wrong)
    rc = selftest.main(["--device", "cpu", "--quick", "--paths", f"cpu:{ISAS[0]}",
                        "--divergences", SUPPORTED[0], "--seed", "7"])
    out = capsys.readouterr().out
    assert rc == 1, out
    assert message in out and "kdfused self-test FAILED" in out


def test_strided_cases_really_are_strided():
    cases = [c for c in C.make_cases(["kl"]) if c.strided and (c.sdt in C.HALF)]
    assert cases
    for c in cases:
        s, t, _, _ = C.on_device(C.make_inputs(c, 3), c, "cpu")
        assert not s.is_contiguous() and not t.is_contiguous()
        assert s.shape == (*c.lead, c.V) and s.dtype == c.sdt


def test_expected_values_agree_with_the_reference_for_kl_and_ce():
    """The self-test's own float64 formulas against kdfused.reference on a few cases."""
    for c in C.make_cases(["kl", "ce"], quick=True)[:6]:
        inp = C.make_inputs(c, 11)
        exp = C.expected(c, inp)
        s, t, y, go = C.on_device(inp, c, "cpu")
        s, t = s.double().requires_grad_(), t.double().requires_grad_()
        kw = dict(temperature=c.temperature, soft_weight=c.soft_weight,
                  hard_weight=c.hard_weight, divergence=c.divergence,
                  ignore_index=c.ignore_index, reduction=c.reduction)
        loss = kdfused.reference.kd_loss(s, t, y, **kw)
        assert C.error_ratio(loss, exp["loss"], exp["loss_tol"]) <= 1e-3, c.describe()
        if not c.loss_only:
            (loss * go).sum().backward()
            assert C.error_ratio(s.grad, exp["grad_s"], exp["grad_s_tol"]) <= 1e-3
