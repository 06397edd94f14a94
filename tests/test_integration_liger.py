"""kdfused.integrations.liger.FusedLinearJSDLoss against Liger-Kernel's LigerFusedLinearJSDLoss.

The reference is the real liger-kernel package (pinned in requirements-dev.txt), run on the CPU in
pure PyTorch (compiled=False). Loss and the gradients of the student's hidden states, weight and
bias are compared for beta 0, 0.5 and 1, several temperatures, ignored rows, with and without
bias, float32 and bfloat16, a grad_output other than 1. Inputs are fresh random ones from the
suite's per-test seed (printed with a failure). Also: the ImportError raised when liger-kernel
is missing (simulated), and that the module itself works without it.
"""

from __future__ import annotations

import importlib
import sys

import liger_kernel  # a requirement of this file (pinned in requirements-dev.txt), not skipped
import pytest
import torch
from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

from kdfused.integrations import require
from kdfused.integrations.liger import LIGER_VERSION, FusedLinearJSDLoss

pytestmark = pytest.mark.fused_only

IGNORE = -100


def _inputs(gen, N, H, Ht, V, Vt=None, bias=False, dtype=torch.float32, ignore_every=3):
    Vt = Vt or V

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)

    sh, sw = r(N, H), r(V, H, scale=2.0 / H**0.5)
    th, tw = r(N, Ht), r(Vt, Ht, scale=2.0 / Ht**0.5)
    sb = r(V, scale=0.5) if bias else None
    tb = r(Vt, scale=0.5) if bias else None
    y = torch.randint(0, V, (N,), generator=gen)
    if ignore_every:
        offset = int(torch.randint(0, ignore_every, (1,), generator=gen))
        y[offset::ignore_every] = IGNORE
    return sh, sw, th, tw, y, sb, tb


def _run(module, sh, sw, th, tw, y, sb, tb, grad_scale=1.0):
    """Loss(es) and the student's gradients, each input a fresh leaf."""
    a, b = sh.clone().requires_grad_(), sw.clone().requires_grad_()
    c = sb.clone().requires_grad_() if sb is not None else None
    out = module(a, b, th, tw, y, c, tb)
    loss = out[0] if isinstance(out, tuple) else out
    (loss * grad_scale).backward()
    vals = tuple(o.detach().double() for o in out) if isinstance(out, tuple) else loss.detach()
    return vals, a.grad, b.grad, (c.grad if c is not None else None)


def _close(x, y, rtol, what):
    x, y = x.double(), y.double()
    tol = rtol * max(1.0, y.abs().max().item())
    err = (x - y).abs().max().item()
    assert err <= tol, f"{what}: max abs diff {err:.3g} > {tol:.3g}"


def _compare(ours, theirs, rtol_loss, rtol_grad, seed):
    (l1, *g1), (l2, *g2) = ours, theirs
    l1 = l1 if isinstance(l1, tuple) else (l1,)
    l2 = l2 if isinstance(l2, tuple) else (l2,)
    for i, (x, y) in enumerate(zip(l1, l2)):
        _close(x, y, rtol_loss, f"loss[{i}] (seed {seed})")
    for name, x, y in zip(("grad hidden", "grad weight", "grad bias"), g1, g2):
        assert (x is None) == (y is None), name
        if x is not None:
            assert x.dtype == y.dtype, name
            _close(x, y, rtol_grad, f"{name} (seed {seed})")


def _pair(**kw):
    ours = FusedLinearJSDLoss(chunk_size=kw.pop("ours_chunk", 16), **kw)
    theirs = LigerFusedLinearJSDLoss(compiled=False, chunk_size=16, **kw)
    return ours, theirs


def test_liger_version():
    assert liger_kernel is not None
    from importlib.metadata import version

    assert version("liger-kernel") == LIGER_VERSION


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 3.0])
@pytest.mark.parametrize("bias", [False, True])
def test_matches_liger_float32(gen, seed, beta, temperature, bias):
    w_hard = float(torch.rand((), generator=gen))
    w_soft = 1.0 - w_hard + 0.25
    args = _inputs(gen, N=53, H=24, Ht=40, V=97, bias=bias)
    ours, theirs = _pair(
        weight_hard_loss=w_hard,
        weight_soft_loss=w_soft,
        beta=beta,
        ignore_index=IGNORE,
        temperature=temperature,
    )
    _compare(_run(ours, *args, 1.7), _run(theirs, *args, 1.7), 2e-6, 2e-5, seed)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_return_soft_hard_loss(gen, seed, beta):
    args = _inputs(gen, N=40, H=16, Ht=16, V=64, bias=True)
    ours, theirs = _pair(
        weight_hard_loss=0.3, weight_soft_loss=0.7, beta=beta, temperature=2.0,
        return_soft_hard_loss=True,
    )  # fmt: skip
    o, t = _run(ours, *args), _run(theirs, *args)
    assert len(o[0]) == 3
    _compare(o, t, 2e-6, 2e-5, seed)


@pytest.mark.parametrize("weight_hard_loss", [0.0, 0.4])
def test_teacher_vocab_larger(gen, seed, weight_hard_loss):
    """Liger pads the student's logits with zeros to the teacher's vocabulary (soft term only)."""
    args = _inputs(gen, N=37, H=16, Ht=20, V=50, Vt=58, bias=True)
    ours, theirs = _pair(
        weight_hard_loss=weight_hard_loss, weight_soft_loss=0.6, beta=0.5, temperature=1.5
    )
    _compare(_run(ours, *args, 0.5), _run(theirs, *args, 0.5), 2e-6, 2e-5, seed)


@pytest.mark.parametrize("weights", [(1.0, 0.0), (0.0, 1.0)])
def test_single_term(gen, seed, weights):
    args = _inputs(gen, N=30, H=16, Ht=16, V=40)
    ours, theirs = _pair(weight_hard_loss=weights[0], weight_soft_loss=weights[1], beta=0.3)
    _compare(_run(ours, *args), _run(theirs, *args), 2e-6, 2e-5, seed)


def test_no_valid_row(gen, seed):
    sh, sw, th, tw, y, sb, tb = _inputs(gen, N=20, H=8, Ht=8, V=30, bias=True)
    y[:] = IGNORE
    ours, theirs = _pair(weight_hard_loss=0.5, weight_soft_loss=0.5, temperature=2.0)
    o = _run(ours, sh, sw, th, tw, y, sb, tb)
    _compare(o, _run(theirs, sh, sw, th, tw, y, sb, tb), 0.0, 0.0, seed)
    assert o[0].item() == 0.0
    assert all(torch.count_nonzero(g) == 0 for g in o[1:])


def test_chunk_size_independent(gen, seed):
    args = _inputs(gen, N=70, H=16, Ht=16, V=40, bias=True)
    kw = dict(weight_hard_loss=0.5, weight_soft_loss=0.5, beta=0.5, temperature=2.0)
    ref = _run(LigerFusedLinearJSDLoss(compiled=False, chunk_size=16, **kw), *args)
    for chunk in (None, 1, 7, 1024):
        _compare(_run(FusedLinearJSDLoss(chunk_size=chunk, **kw), *args), ref, 2e-6, 2e-5, seed)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_matches_liger_bfloat16(gen, seed, beta):
    """bfloat16: Liger computes the soft term in bfloat16, kdfused in float32, so the two agree to
    bfloat16's rounding; kdfused is compared with Liger run on the same inputs in float32 too."""
    args = _inputs(gen, N=48, H=32, Ht=32, V=80, bias=True, dtype=torch.bfloat16)
    kw = dict(weight_hard_loss=0.5, weight_soft_loss=0.5, beta=beta, temperature=2.0)
    ours, theirs = _pair(**kw)
    o = _run(ours, *args)
    _compare(o, _run(theirs, *args), 3e-2, 3e-2, seed)
    args32 = [a.float() if a is not None and a.is_floating_point() else a for a in args]
    ref = _run(theirs, *args32)
    ref = (ref[0], *(g.bfloat16() for g in ref[1:]))
    _compare(o, ref, 2e-3, 1e-2, seed)


def test_teacher_requires_grad(gen, seed):
    sh, sw, th, tw, y, sb, tb = _inputs(gen, N=20, H=8, Ht=8, V=30, bias=True)
    th, tw, tb = (t.clone().requires_grad_() for t in (th, tw, tb))
    ours, theirs = _pair(weight_hard_loss=0.5, weight_soft_loss=0.5)
    _compare(_run(ours, sh, sw, th, tw, y, sb, tb), _run(theirs, sh, sw, th, tw, y, sb, tb),
             2e-6, 2e-5, seed)  # fmt: skip
    assert th.grad is None and tw.grad is None and tb.grad is None


def test_from_liger():
    liger = LigerFusedLinearJSDLoss(0.2, 0.8, 0.3, -1, 2.5, False, 64, True)
    ours = FusedLinearJSDLoss.from_liger(liger)
    for name in ("weight_hard_loss", "weight_soft_loss", "beta", "ignore_index", "temperature",
                 "compiled", "chunk_size", "return_soft_hard_loss"):  # fmt: skip
        assert getattr(ours, name) == getattr(liger, name), name
    with pytest.raises(TypeError, match="LigerFusedLinearJSDLoss"):
        FusedLinearJSDLoss.from_liger(torch.nn.Linear(2, 2))


def test_bad_arguments(gen):
    with pytest.raises(ValueError, match="Temperature"):
        FusedLinearJSDLoss(temperature=0)
    args = _inputs(gen, N=8, H=8, Ht=8, V=16)
    with pytest.raises(ValueError, match="temperature"):
        FusedLinearJSDLoss(temperature=-1.0)(*args)
    with pytest.raises(ValueError, match="beta"):
        FusedLinearJSDLoss(beta=1.5)(*args)


def _hide(monkeypatch, *names):
    """Makes `import name` fail as for a package that is not installed."""
    for name in list(sys.modules):
        if name == "liger_kernel" or name.startswith("liger_kernel."):
            monkeypatch.delitem(sys.modules, name)
    for name in names:
        monkeypatch.setitem(sys.modules, name, None)


def test_missing_liger_import_error(monkeypatch):
    _hide(monkeypatch, "liger_kernel", "liger_kernel.chunked_loss")
    with pytest.raises(ImportError) as info:
        FusedLinearJSDLoss.from_liger(object())
    msg = str(info.value)
    assert "liger-kernel" in msg and f"pip install liger-kernel=={LIGER_VERSION}" in msg, msg
    assert "from_liger" in msg, msg
    assert isinstance(info.value.__cause__, ImportError)


def test_require_message(monkeypatch):
    monkeypatch.setitem(sys.modules, "some_optional_pkg", None)
    with pytest.raises(ImportError, match=r"'some-optional'.*pip install some-optional$"):
        require("some_optional_pkg", "some-optional")
    assert require("math", "math").sqrt(4.0) == 2.0


def test_module_works_without_liger(monkeypatch, gen):
    """The integration modules import, and compute, with liger-kernel missing."""
    _hide(monkeypatch, "liger_kernel", "liger_kernel.chunked_loss")
    import kdfused
    import kdfused.integrations

    # the fresh imports below rebind these attributes; monkeypatch puts the originals back
    monkeypatch.setattr(kdfused, "integrations", kdfused.integrations)
    monkeypatch.setattr(kdfused.integrations, "liger", sys.modules["kdfused.integrations.liger"])
    for name in ("kdfused.integrations", "kdfused.integrations.liger"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    mod = importlib.import_module("kdfused.integrations.liger")
    assert "liger_kernel" not in {k for k, v in sys.modules.items() if v is not None}
    loss = mod.FusedLinearJSDLoss()(*_inputs(gen, N=8, H=8, Ht=8, V=16))
    assert torch.isfinite(loss)
    assert importlib.import_module("kdfused.integrations").liger is mod
