"""The logit transform and the entropy in the fused ops beyond test_logit_transform.py's shared
cases: every CPU instruction set (the scalar path runs the CUDA kernels' per-element code), rows
long enough for several chunks and for a row split over threads, the fused linear op (against
kd_loss's float64 reference on the materialised logits), the modules, and torch.compile. The
independent float64 computation is test_logit_transform.py's.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_logit_transform import (
    DIVERGENCES,
    F64,
    IGNORE,
    REDUCTIONS,
    TOL_GRAD,
    TOL_LOSS,
    _check_kd,
    _kd_options,
    _scalar,
    assert_close,
    independent_entropy,
    independent_topk,
    make_inputs,
    make_topk_inputs,
    make_transform,
)

import kdfused
from kdfused import reference

pytestmark = pytest.mark.fused_only


def _compiled_isas() -> list:
    try:
        return kdfused.build_info()["cpu_isa_compiled"]
    except ImportError:
        return ["default"]


ISAS = _compiled_isas()


@pytest.mark.parametrize("isa", ISAS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize(
    ("lead", "V"),
    [((3,), 7), ((2, 2), 2049), ((2,), 9001)],
    ids=["V7", "V2049-chunks", "V9001-split"],
)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_every_isa(isa, dtype, lead, V, divergence, gen):
    """Values and both gradients against float64 (both sides transformed, softcapped, negative
    scales), and the entropy, on every compiled instruction set; rows of 9001 columns are split
    over threads (fewer rows than twice the threads; one of the two rows is ignored)."""
    s, t, y, masked = make_inputs(gen, lead, V, dtype)
    tf = make_transform(gen, "both", True, -1.0 if V % 2 else 1.0)
    kw = _kd_options(gen, divergence)
    _check_kd(kdfused.kd_loss, gen, s, t, y, masked, tf, kw, "mean", 4 * TOL_LOSS[dtype],
              TOL_GRAD[dtype])  # fmt: skip
    loss, H = kdfused.kd_loss(s, t, y, return_entropy=True, **kw, **tf)
    want = independent_entropy(s.to(F64), y, tf=tf, temperature=kw["temperature"])
    assert_close(H, want, 4 * TOL_LOSS[dtype], "entropy")
    assert torch.equal(loss, kdfused.kd_loss(s, t, y, **kw, **tf))
    assert kdfused.build_info()["cpu_isa"] == isa


@pytest.mark.parametrize("isa", ISAS, indirect=True)
@pytest.mark.parametrize("V", [41, 4099])
@pytest.mark.parametrize("divergence", ["kl", "ce"])
def test_topk_every_isa(isa, V, divergence, gen):
    s, idx, v, y, masked = make_topk_inputs(gen, 5, V, 9, torch.float32)
    tf = make_transform(gen, "both", True, -1.0)
    kw = _kd_options(gen, divergence)
    del kw["beta"]
    sa = s.clone().requires_grad_()
    loss = kdfused.topk_kd_loss(sa, idx, v, y, reduction="sum", **kw, **tf)
    s64 = s.to(F64).requires_grad_()
    want = independent_topk(s64, idx, v.to(F64), y, reduction="sum", tf=tf, **kw)
    assert_close(loss, want, 4 * TOL_LOSS[torch.float32], "loss")
    g = torch.autograd.grad(loss, sa)[0]
    assert_close(g, torch.autograd.grad(want, s64)[0], TOL_GRAD[torch.float32], "grad")
    assert (g[masked] == 0).all() and (g[y == IGNORE] == 0).all()


@pytest.mark.parametrize("isa", ISAS, indirect=True)
def test_plain_call_bitwise_across_spellings(isa, gen):
    """Scale 1 and no softcap run the untransformed kernel: bitwise the call without them."""
    s, t, y, _ = make_inputs(gen, (4,), 2100, torch.bfloat16)
    for divergence in DIVERGENCES:
        kw = _kd_options(gen, divergence)
        a = kdfused.kd_loss(s, t, y, **kw)
        b = kdfused.kd_loss(s, t, y, student_logit_scale=1, teacher_softcap=None, **kw)
        assert torch.equal(a, b)


# ---------------------------------------------------------------- linear_kd_loss


def _linear_case(gen, N, H, V, dtype):
    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=F64) * scale).to(dtype)

    h, W, b = rnd(N, H), rnd(V, H, scale=0.8), rnd(V)
    th, tW = rnd(N, H + 2), rnd(V, H + 2, scale=0.9)
    y = torch.randint(0, V, (N,), generator=gen)
    y[1] = IGNORE
    return h, W, b, th, tW, y


@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("teacher", ["hidden", "logits"])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_linear(dtype, reduction, teacher, divergence, gen):
    """linear_kd_loss with both transforms and return_entropy against the float64 reference on
    the materialised logits: loss, entropy and the gradients of hidden, weight and bias (chunks
    of 3 rows; "none" recomputes in backward)."""
    N, H, V = 7, 5, 37
    h, W, b, th, tW, y = _linear_case(gen, N, H, V, dtype)
    tf = make_transform(gen, "both", True, -1.0 if divergence in ("kl", "tvd") else 1.0)
    kw = _kd_options(gen, divergence)
    hg, Wg, bg = (x.clone().requires_grad_() for x in (h, W, b))
    teacher_kw = dict(teacher_hidden=th, teacher_weight=tW)
    tl = F.linear(th.to(F64), tW.to(F64))
    if teacher == "logits":
        teacher_kw = dict(teacher_logits=tl.to(dtype))
    loss, Hs = kdfused.linear_kd_loss(
        hg, Wg, labels=y, student_bias=bg, reduction=reduction, chunk_size=3,
        return_entropy=True, **teacher_kw, **kw, **tf,
    )  # fmt: skip
    h64, W64, b64 = (x.to(F64).requires_grad_() for x in (h, W, b))
    s64 = F.linear(h64, W64, b64)
    want, want_H = reference.kd_loss(
        s64, tl, y, reduction=reduction, return_entropy=True, **kw, **tf
    )
    tol = TOL_LOSS[dtype]
    assert_close(loss, want, 4 * tol, "loss")
    assert Hs.shape == (N,) and Hs.grad_fn is None and Hs[1] == 0
    assert_close(Hs, want_H, 4 * tol, "entropy")
    obj, w = _scalar(loss, gen)
    obj64 = want.sum() if w is None else (want * w).sum()
    got = torch.autograd.grad(obj, (hg, Wg, bg))
    exp = torch.autograd.grad(obj64, (h64, W64, b64))
    for name, g, e in zip(("hidden", "weight", "bias"), got, exp):
        assert_close(g, e, 10 * TOL_GRAD[dtype], f"d/d{name} ({reduction})")


def test_linear_bf16(gen):
    """16-bit weights: the kernel reads bf16 logits, the gradient is rounded once."""
    N, H, V = 6, 8, 29
    h, W, _, th, tW, y = _linear_case(gen, N, H, V, torch.bfloat16)
    tf = make_transform(gen, "both", True)
    kw = _kd_options(gen, "jsd")
    hg, Wg = h.clone().requires_grad_(), W.clone().requires_grad_()
    loss = kdfused.linear_kd_loss(hg, Wg, th, tW, y, **kw, **tf)
    s = F.linear(h, W)  # the same bf16 logits the op computes
    t = F.linear(th, tW)
    sa = s.clone().to(F64).requires_grad_()
    want = reference.kd_loss(sa, t.to(F64), y, **kw, **tf)
    assert_close(loss, want, 1e-4, "loss")
    gh, gW = torch.autograd.grad(loss, (hg, Wg))
    gs = torch.autograd.grad(want, sa)[0]
    assert_close(gh, gs @ W.to(F64), 3e-2, "d/dhidden")
    assert_close(gW, gs.t() @ h.to(F64), 3e-2, "d/dweight")


# ---------------------------------------------------------------- modules and torch.compile


def test_modules_take_the_transform(gen):
    s, t, y, _ = make_inputs(gen, (3,), 17, torch.float32, garbage=False)
    tf = dict(student_softcap=30.0, teacher_logit_scale=0.5)
    crit = kdfused.KDLoss(temperature=2.0, **tf)
    assert "student_softcap=30.0" in repr(crit) and "teacher_logit_scale=0.5" in repr(crit)
    assert "teacher_softcap" not in repr(crit)  # (the identity's values are not printed)
    assert torch.equal(crit(s, t, y), kdfused.kd_loss(s, t, y, temperature=2.0, **tf))
    crit.student_softcap = None
    assert torch.equal(
        crit(s, t, y), kdfused.kd_loss(s, t, y, temperature=2.0, **dict(tf, student_softcap=None))
    )
    with pytest.raises(ValueError, match="student_softcap"):
        crit.student_softcap = -1.0
    h, W, _, th, tW, y2 = _linear_case(gen, 5, 4, 11, torch.float32)
    lin = kdfused.LinearKDLoss(student_logit_scale=0.25, teacher_softcap=2.0)
    assert torch.equal(
        lin(h, W, th, tW, y2),
        kdfused.linear_kd_loss(h, W, th, tW, y2, student_logit_scale=0.25, teacher_softcap=2.0),
    )
    s2, idx, v, y3, _ = make_topk_inputs(gen, 4, 23, 5, torch.float32)
    tk = kdfused.TopKKDLoss(student_softcap=3.0, teacher_logit_scale=2.0)
    assert torch.equal(
        tk(s2, idx, v, y3),
        kdfused.topk_kd_loss(s2, idx, v, y3, student_softcap=3.0, teacher_logit_scale=2.0),
    )


def test_compile_fullgraph(gen):
    s, t, y, _ = make_inputs(gen, (4,), 33, torch.float32, garbage=False)
    tf = dict(student_softcap=5.0, teacher_softcap=4.0, student_logit_scale=0.7)

    def f(s, t, y):
        loss, H = kdfused.kd_loss(s, t, y, temperature=2.0, divergence="jsd", return_entropy=True,
                                  **tf)  # fmt: skip
        return loss, H

    sa, sb = s.clone().requires_grad_(), s.clone().requires_grad_()
    loss, H = torch.compile(f, fullgraph=True)(sa, t, y)
    want, want_H = f(sb, t, y)
    assert torch.equal(loss, want.detach()) and torch.equal(H, want_H)
    loss.backward()
    want.backward()
    assert torch.equal(sa.grad, sb.grad)
