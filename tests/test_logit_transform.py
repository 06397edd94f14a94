"""The logit transform (per side: z = scale * x, then z = softcap * tanh(z / softcap)) and the
student's entropy (``return_entropy``), against a float64 computation written out here with plain
torch ops. It calls nothing of kdfused's but the functions under test: per row, the masked (-inf)
columns are left out of the vocabulary, ignored rows are left out of the loss, and autograd
differentiates the float64 formulas.

The functions under test are listed in KD_IMPLS / TOPK_IMPLS: an implementation that takes the
keywords joins by one line there. Inputs are fresh random draws each run (the ``gen`` fixture).
"""

from __future__ import annotations

import math
import re

import pytest
import torch

from kdfused import reference
from kdfused._checks import check_logit_transform

from trl_jsd import generalized_jsd_per_token

# The kd_loss-like and topk_kd_loss-like functions that take student_logit_scale,
# teacher_logit_scale, student_softcap, teacher_softcap (and, for KD_IMPLS, return_entropy).
KD_IMPLS = [pytest.param(reference.kd_loss, id="reference")]
TOPK_IMPLS = [pytest.param(reference.topk_kd_loss, id="reference_topk")]
try:
    import kdfused

    KD_IMPLS.append(pytest.param(kdfused.kd_loss, id="fused", marks=pytest.mark.fused_only))
    TOPK_IMPLS.append(
        pytest.param(kdfused.topk_kd_loss, id="fused_topk", marks=pytest.mark.fused_only)
    )
except ImportError:  # no extension: the reference alone
    pass

F64 = torch.float64
DIVERGENCES = ("kl", "ce", "reverse_kl", "jsd", "tvd")
REDUCTIONS = ("batchmean", "mean", "sum", "none")
IGNORE = -100
SIDES = ("student", "teacher", "both")
# Relative tolerance (to the largest expected magnitude) of the loss and of the gradients, by
# input dtype: the accumulation (float32 for 16/32-bit inputs) and, for 16-bit inputs, the
# rounding of the gradient to the input's dtype.
TOL_LOSS = {F64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 2e-5, torch.float16: 2e-5}
TOL_GRAD = {F64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}


# ---------------------------------------------------------------- the independent computation


def _transform(x, scale, softcap):
    """x: finite float64 entries only (the masked columns are not passed)."""
    z = scale * x
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z


def _log_softmax(a):
    return a - torch.logsumexp(a, dim=0)


def _divergence(lp, lq, divergence, beta):
    p, q = lp.exp(), lq.exp()
    if divergence == "jsd" and beta == 0.0:
        divergence = "kl"
    if divergence == "jsd" and beta == 1.0:
        divergence = "reverse_kl"
    if divergence == "kl":
        return (p * (lp - lq)).sum()
    if divergence == "ce":
        return -(p * lq).sum()
    if divergence == "reverse_kl":
        return (q * (lq - lp)).sum()
    if divergence == "jsd":
        lm = torch.log(beta * p + (1.0 - beta) * q)
        return beta * (p * (lp - lm)).sum() + (1.0 - beta) * (q * (lq - lm)).sum()
    assert divergence == "tvd"
    return 0.5 * (p - q).abs().sum()


def _reduce(rows, n_valid, reduction, lead):
    if reduction == "none":
        return rows.reshape(lead)
    total = rows.sum()
    return total if reduction == "sum" else total / max(n_valid, 1)


def _student_rows(s2, y, tf):
    """Per row r of the student's (rows, V) logits: (r, its unmasked columns, their transformed
    logits), or (r, None, None) for an ignored row."""
    for r in range(s2.shape[0]):
        if y is not None and int(y.reshape(-1)[r]) == IGNORE:
            yield r, None, None
            continue
        keep = torch.isfinite(s2[r]).nonzero().squeeze(1)
        yield r, keep, _transform(s2[r, keep], tf["student_logit_scale"], tf["student_softcap"])


def _hard_ce(zs, keep, y, r):
    """Row r's cross-entropy at T = 1 on the transformed logits of its unmasked columns."""
    at = int((keep == int(y.reshape(-1)[r])).nonzero()[0, 0])
    return torch.logsumexp(zs, dim=0) - zs[at]


def _independent_loss(s, y, soft_term, *, reduction, tf, temperature, soft_weight, hard_weight):
    """Each row of s (..., V): soft_weight T^2 soft_term(r, keep, zs) (row r's divergence, given
    its unmasked columns and their transformed logits) + hard_weight x the hard CE, 0 at ignored
    rows; reduced like kd_loss."""
    lead, V = s.shape[:-1], s.shape[-1]
    T = temperature
    rows = []
    for r, keep, zs in _student_rows(s.reshape(-1, V), y, tf):
        row = torch.zeros((), dtype=F64)
        if keep is not None:  # (an ignored row stays 0)
            if soft_weight != 0:
                row = row + soft_weight * T * T * soft_term(r, keep, zs)
            if hard_weight != 0:
                row = row + hard_weight * _hard_ce(zs, keep, y, r)
        rows.append(row)
    n_valid = len(rows) if y is None else int((y != IGNORE).sum())
    return _reduce(torch.stack(rows), n_valid, reduction, lead)


def independent_kd(s, t, y, *, tf, temperature, divergence, beta, **weights_and_reduction):
    """s, t: float64 (..., V), a column masked (-inf) in a row on both sides; y: labels or None."""
    t2 = t.reshape(-1, t.shape[-1])
    T = temperature

    def soft_term(r, keep, zs):
        zt = _transform(t2[r, keep], tf["teacher_logit_scale"], tf["teacher_softcap"])
        return _divergence(_log_softmax(zt / T), _log_softmax(zs / T), divergence, beta)

    return _independent_loss(s, y, soft_term, tf=tf, temperature=T, **weights_and_reduction)


def independent_entropy(s, y, *, tf, temperature):
    """-sum q log q of q = softmax(z_s / T) per row over the unmasked columns; 0 at ignored rows."""
    lead, V = s.shape[:-1], s.shape[-1]
    s2 = s.reshape(-1, V)
    out = torch.zeros(s2.shape[0], dtype=F64)
    for r, keep, zs in _student_rows(s2, y, tf):
        if keep is None:  # an ignored row
            continue
        lq = _log_softmax(zs / temperature)
        out[r] = -(lq.exp() * lq).sum()
    return out.reshape(lead)


def independent_topk(s, idx, v, y, *, tf, temperature, divergence, **weights_and_reduction):
    """Top-k: p over the k stored values (a -inf value has no mass), q over the vocabulary."""
    k = idx.shape[-1]
    idx2, v2 = idx.reshape(-1, k), v.reshape(-1, k)
    T = temperature

    def soft_term(r, keep, zs):
        lq = _log_softmax(zs / T)
        has = torch.isfinite(v2[r])
        pos = torch.searchsorted(keep, idx2[r, has])
        assert torch.equal(keep[pos], idx2[r, has])
        zt = _transform(v2[r, has], tf["teacher_logit_scale"], tf["teacher_softcap"])
        lp = _log_softmax(zt / T)
        if divergence == "kl":
            return (lp.exp() * (lp - lq[pos])).sum()
        return -(lp.exp() * lq[pos]).sum()

    return _independent_loss(s, y, soft_term, tf=tf, temperature=T, **weights_and_reduction)


# ---------------------------------------------------------------- inputs and comparisons


def _uniform(gen, lo, hi):
    return lo + (hi - lo) * float(torch.rand((), generator=gen, dtype=F64))


def make_inputs(gen, lead, V, dtype, *, n_masked=2, garbage=True):
    """Student and teacher logits (rounded to ``dtype``) with ``n_masked`` columns per row at
    -inf on both sides, labels at unmasked columns, one ignored row (holding NaN / -inf when
    ``garbage``); returns (s, t, y, masked)."""
    N = math.prod(lead)
    s = torch.randn(N, V, generator=gen, dtype=F64) * _uniform(gen, 1.0, 4.0)
    t = torch.randn(N, V, generator=gen, dtype=F64) * _uniform(gen, 1.0, 4.0)
    s, t = s.to(dtype), t.to(dtype)
    masked = torch.zeros(N, V, dtype=torch.bool)
    y = torch.empty(N, dtype=torch.int64)
    for r in range(N):
        perm = torch.randperm(V, generator=gen)
        masked[r, perm[:n_masked]] = True
        y[r] = perm[n_masked]
    s[masked] = float("-inf")
    t[masked] = float("-inf")
    bad = int(torch.randint(0, N, (), generator=gen))
    y[bad] = IGNORE
    if garbage:
        s[bad, ::2] = float("nan")
        t[bad] = float("-inf")
    return s.reshape(*lead, V), t.reshape(*lead, V), y.reshape(lead), masked.reshape(*lead, V)


def make_transform(gen, side, softcap, sign=1.0):
    """The transform keywords for ``side``: a scale of magnitude in [0.5, 2] with ``sign`` and, when
    ``softcap``, a softcap in [1.5, 5] (the logits reach the tanh's curved part)."""
    tf = dict(
        student_logit_scale=1.0, teacher_logit_scale=1.0, student_softcap=None, teacher_softcap=None
    )
    for who in ("student", "teacher"):
        if side in (who, "both"):
            tf[f"{who}_logit_scale"] = sign * _uniform(gen, 0.5, 2.0)
            if softcap:
                tf[f"{who}_softcap"] = _uniform(gen, 1.5, 5.0)
    return tf


def assert_close(got, want, tol, what):
    got, want = got.detach().to(F64), want.detach().to(F64)
    assert got.shape == want.shape, what
    assert torch.isfinite(got).all(), f"{what}: not finite"
    # Floor: the rounding of terms of order 1 whatever the result's size (a gradient through a
    # scale of 0 is 0 in exact arithmetic; the teacher's gradient at a column where p ~ 1 is
    # p (1 - p) with 1 - p cancelling in the accumulation dtype).
    atol = tol * max(float(want.abs().max()), 0.05)
    torch.testing.assert_close(got, want, rtol=tol, atol=atol, msg=lambda m: f"{what}: {m}")


def _scalar(loss, gen):
    """A scalar that depends on every element of ``loss`` (random weights for "none")."""
    if loss.dim() == 0:
        return loss, None
    w = torch.rand(loss.shape, generator=gen, dtype=F64) + 0.5
    return (loss * w.to(loss.dtype)).sum(), w


def _check_kd(fn, gen, s, t, y, masked, tf, kw, reduction, tol_loss, tol_grad, grad_t=True):
    sa = s.clone().requires_grad_()
    ta = t.clone().requires_grad_(grad_t)
    loss = fn(sa, ta, y, reduction=reduction, **kw, **tf)
    acc = F64 if s.dtype == F64 else torch.float32
    assert loss.dtype == acc
    s64 = s.to(F64).requires_grad_()
    t64 = t.to(F64).requires_grad_(grad_t)
    want = independent_kd(s64, t64, y, reduction=reduction, tf=tf, **kw)
    assert_close(loss, want, tol_loss, f"loss ({reduction})")
    obj, w = _scalar(loss, gen)
    obj64 = want.sum() if w is None else (want * w).sum()
    inputs, inputs64 = (sa, ta) if grad_t else (sa,), (s64, t64) if grad_t else (s64,)
    got = torch.autograd.grad(obj, inputs)
    exp = torch.autograd.grad(obj64, inputs64)
    for name, g, e, x in zip(("student", "teacher"), got, exp, inputs):
        assert g.dtype == x.dtype
        assert_close(g, e, tol_grad, f"d/d{name} ({reduction})")
        # masked columns and ignored rows: exactly 0
        assert (g[masked] == 0).all(), f"d/d{name}: nonzero at a masked column"
        assert (g[y == IGNORE] == 0).all(), f"d/d{name}: nonzero at an ignored row"


def _kd_options(gen, divergence, hard=True):
    return dict(
        temperature=_uniform(gen, 0.5, 3.0),
        soft_weight=_uniform(gen, 0.3, 1.5),
        hard_weight=_uniform(gen, 0.2, 1.0) if hard else 0.0,
        divergence=divergence,
        beta=_uniform(gen, 0.1, 0.9),
    )


# ---------------------------------------------------------------- kd_loss: values and gradients


@pytest.mark.parametrize("fn", KD_IMPLS)
@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("sign", [1.0, -1.0], ids=["pos_scale", "neg_scale"])
@pytest.mark.parametrize("softcap", [False, True], ids=["nocap", "softcap"])
@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_kd_transform(fn, dtype, sign, softcap, side, divergence, gen):
    s, t, y, masked = make_inputs(gen, (2, 3), 23, dtype)
    tf = make_transform(gen, side, softcap, sign)
    kw = _kd_options(gen, divergence)
    for reduction in REDUCTIONS:
        _check_kd(fn, gen, s, t, y, masked, tf, kw, reduction, TOL_LOSS[dtype], TOL_GRAD[dtype])


@pytest.mark.parametrize("fn", KD_IMPLS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_kd_transform_16bit(fn, dtype, divergence, gen):
    """16-bit inputs against float64 of the same rounded inputs (loss float32, gradients in the
    input's dtype)."""
    s, t, y, masked = make_inputs(gen, (5,), 31, dtype)
    tf = make_transform(gen, "both", True, -1.0 if _uniform(gen, 0, 1) < 0.5 else 1.0)
    kw = _kd_options(gen, divergence)
    for reduction in REDUCTIONS:
        _check_kd(fn, gen, s, t, y, masked, tf, kw, reduction, TOL_LOSS[dtype], TOL_GRAD[dtype])


@pytest.mark.parametrize("fn", KD_IMPLS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_kd_transform_scale_zero_and_no_labels(fn, divergence, gen):
    """A scale of 0 (the student's distribution is uniform over its unmasked columns), and the
    soft term alone without labels (every row counts)."""
    s, t, y, masked = make_inputs(gen, (4,), 17, F64)
    tf = make_transform(gen, "teacher", True)
    tf["student_logit_scale"] = 0.0
    kw = _kd_options(gen, divergence)
    for reduction in REDUCTIONS:
        _check_kd(fn, gen, s, t, y, masked, tf, kw, reduction, TOL_LOSS[F64], TOL_GRAD[F64])
    s, t, _, masked = make_inputs(gen, (4,), 17, F64, garbage=False)
    none = torch.full((4,), 0, dtype=torch.int64)  # (no row ignored: checked as labels=None)
    tf = make_transform(gen, "both", True, -1.0)
    kw = _kd_options(gen, divergence, hard=False)
    for reduction in REDUCTIONS:
        sa, ta = s.clone().requires_grad_(), t.clone().requires_grad_()
        loss = fn(sa, ta, None, reduction=reduction, **kw, **tf)
        want = independent_kd(s, t, None, reduction=reduction, tf=tf, **kw)
        assert_close(loss, want, TOL_LOSS[F64], f"loss without labels ({reduction})")
        with_labels = fn(s, t, none, reduction=reduction, **kw, **tf)
        assert torch.equal(loss.detach(), with_labels)


@pytest.mark.parametrize("fn", KD_IMPLS)
@pytest.mark.parametrize("scale", [0.0, -1.5])
def test_kd_teacher_unused_without_soft_term(fn, scale, gen):
    """soft_weight == 0: whatever the teacher holds (NaN, +inf) reaches neither the loss nor a
    gradient, with a teacher transform too."""
    s, t, y, masked = make_inputs(gen, (2, 4), 19, torch.float32)
    t[0, :, 3] = float("nan")
    t[1, :, 4] = float("inf")
    tf = make_transform(gen, "both", True, -1.0)
    tf["teacher_logit_scale"] = scale
    kw = _kd_options(gen, "kl")
    kw["soft_weight"] = 0.0
    for reduction in REDUCTIONS:
        sa, ta = s.clone().requires_grad_(), t.clone().requires_grad_()
        loss = fn(sa, ta, y, reduction=reduction, **kw, **tf)
        gs, gt = torch.autograd.grad(_scalar(loss, gen)[0], (sa, ta))
        assert torch.isfinite(loss).all() and torch.isfinite(gs).all()
        assert (gt == 0).all()
        want = independent_kd(s.to(F64), t.to(F64), y, reduction=reduction, tf=tf, **kw)
        assert_close(loss, want, TOL_LOSS[torch.float32], f"loss ({reduction})")


@pytest.mark.parametrize("fn", KD_IMPLS)
@pytest.mark.parametrize("dtype", [F64, torch.float32, torch.bfloat16], ids=["f64", "f32", "bf16"])
def test_kd_defaults_bitwise(fn, dtype, gen):
    """Scale 1 and no softcap, given or not (1 as an int too), and return_entropy: the same loss
    and gradients, bitwise."""
    s, t, y, _ = make_inputs(gen, (2, 3), 19, dtype)
    for divergence in DIVERGENCES:
        kw = _kd_options(gen, divergence)
        for reduction in REDUCTIONS:
            results = []
            for extra in (
                {},
                dict(student_logit_scale=1.0, teacher_logit_scale=1.0),
                dict(student_logit_scale=1, teacher_logit_scale=1, student_softcap=None),
                dict(return_entropy=False),
            ):
                sa, ta = s.clone().requires_grad_(), t.clone().requires_grad_()
                loss = fn(sa, ta, y, reduction=reduction, **kw, **extra)
                obj = loss.sum()
                results.append((loss.detach(), *torch.autograd.grad(obj, (sa, ta))))
            sa, ta = s.clone().requires_grad_(), t.clone().requires_grad_()
            loss, _ = fn(sa, ta, y, reduction=reduction, return_entropy=True, **kw)
            results.append((loss.detach(), *torch.autograd.grad(loss.sum(), (sa, ta))))
            for other in results[1:]:
                for a, b in zip(other, results[0]):
                    assert torch.equal(a, b), (divergence, reduction)


# ---------------------------------------------------------------- entropy


@pytest.mark.parametrize("fn", KD_IMPLS)
@pytest.mark.parametrize("dtype", [F64, torch.float32, torch.bfloat16], ids=["f64", "f32", "bf16"])
@pytest.mark.parametrize("transform", [False, True], ids=["identity", "transform"])
@pytest.mark.parametrize("soft_weight", [0.0, 0.7])
def test_entropy(fn, dtype, transform, soft_weight, gen):
    s, t, y, masked = make_inputs(gen, (2, 3), 29, dtype)
    tf = make_transform(gen, "both", True, -1.0) if transform else make_transform(gen, "none", 0)
    T = _uniform(gen, 0.5, 3.0)
    kw = dict(temperature=T, soft_weight=soft_weight, hard_weight=_uniform(gen, 0.2, 1.0))
    want = independent_entropy(s.to(F64), y, tf=tf, temperature=T)
    acc = F64 if dtype == F64 else torch.float32
    for divergence in DIVERGENCES:
        for reduction in REDUCTIONS:
            sa, ta = s.clone().requires_grad_(), t.clone().requires_grad_()
            opts = dict(kw, divergence=divergence, reduction=reduction, **tf)
            loss, H = fn(sa, ta, y, return_entropy=True, **opts)
            assert H.shape == y.shape and H.dtype == acc
            assert not H.requires_grad and H.grad_fn is None
            assert torch.isfinite(H).all()
            assert (H[y == IGNORE] == 0).all()
            assert_close(H, want, TOL_LOSS[F64 if dtype == F64 else torch.float32], "entropy")
            g = torch.autograd.grad(loss.sum(), (sa, ta))
            sb, tb = s.clone().requires_grad_(), t.clone().requires_grad_()
            plain = fn(sb, tb, y, **opts)
            assert torch.equal(loss.detach(), plain.detach())
            for a, b in zip(g, torch.autograd.grad(plain.sum(), (sb, tb))):
                assert torch.equal(a, b)


@pytest.mark.parametrize("fn", KD_IMPLS)
def test_entropy_without_labels(fn, gen):
    s, t, _, _ = make_inputs(gen, (3, 2), 13, torch.float32, garbage=False)
    T = _uniform(gen, 0.5, 3.0)
    loss, H = fn(s, t, None, temperature=T, return_entropy=True)
    want = independent_entropy(s.to(F64), None, tf=make_transform(gen, "none", 0), temperature=T)
    assert H.shape == (3, 2) and H.dtype == torch.float32
    assert_close(H, want, TOL_LOSS[torch.float32], "entropy")
    # float64 when either input is float64
    loss, H = fn(s, t.to(F64), None, temperature=T, return_entropy=True)
    assert H.dtype == F64 and loss.dtype == F64
    assert_close(H, want, TOL_LOSS[F64], "entropy (float64 teacher)")


# ---------------------------------------------------------------- TRL's per-token loss


def trl_per_token_loss(student, teacher, labels, *, beta, temperature, tf):
    """TRL's generalised JSD per token (GKDTrainer.generalized_jsd_loss) with each side's logits
    scaled and soft-capped first, averaged over the tokens whose label is not -100."""
    zs = _transform(student, tf["student_logit_scale"], tf["student_softcap"])
    zt = _transform(teacher, tf["teacher_logit_scale"], tf["teacher_softcap"])
    per_token = generalized_jsd_per_token(zs, zt, beta, temperature)
    mask = labels != IGNORE
    return per_token[mask].sum() / mask.sum()


@pytest.mark.parametrize("fn", KD_IMPLS)
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0, "random"])
def test_trl_per_token_formula(fn, beta, gen):
    s, t, y, _ = make_inputs(gen, (2, 5), 37, F64, n_masked=0, garbage=False)
    beta = _uniform(gen, 0.05, 0.95) if beta == "random" else beta
    T = _uniform(gen, 0.5, 3.0)
    tf = make_transform(gen, "both", True, 1.0)
    sa = s.clone().requires_grad_()
    loss = fn(sa, t, y, temperature=T, soft_weight=1.0 / T**2, divergence="jsd", beta=beta,
              reduction="mean", **tf)  # fmt: skip
    s64 = s.clone().requires_grad_()
    want = trl_per_token_loss(s64, t, y, beta=beta, temperature=T, tf=tf)
    assert_close(loss, want, 1e-10, "TRL loss")
    g, e = torch.autograd.grad(loss, sa)[0], torch.autograd.grad(want, s64)[0]
    assert_close(g, e, 1e-9, "TRL d/dstudent")


# ---------------------------------------------------------------- top-k


def make_topk_inputs(gen, N, V, k, dtype):
    s, _, y, masked = make_inputs(gen, (N,), V, dtype, garbage=False)
    idx = torch.empty(N, k, dtype=torch.int64)
    for r in range(N):
        free = (~masked[r]).nonzero().squeeze(1)
        idx[r] = free[torch.randperm(free.numel(), generator=gen)[:k]]
    v = (torch.randn(N, k, generator=gen, dtype=F64) * _uniform(gen, 1.0, 4.0)).to(dtype)
    v[int(torch.randint(0, N, (), generator=gen)), int(torch.randint(0, k, (), generator=gen))] = (
        float("-inf")
    )
    return s, idx, v, y, masked


@pytest.mark.parametrize("fn", TOPK_IMPLS)
@pytest.mark.parametrize("dtype", [F64, torch.float32, torch.bfloat16], ids=["f64", "f32", "bf16"])
@pytest.mark.parametrize("sign", [1.0, -1.0], ids=["pos_scale", "neg_scale"])
@pytest.mark.parametrize("softcap", [False, True], ids=["nocap", "softcap"])
@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("divergence", ["kl", "ce"])
def test_topk_transform(fn, dtype, sign, softcap, side, divergence, gen):
    s, idx, v, y, masked = make_topk_inputs(gen, 6, 41, 7, dtype)
    tf = make_transform(gen, side, softcap, sign)
    kw = _kd_options(gen, divergence)
    del kw["beta"]
    for reduction in REDUCTIONS:
        sa = s.clone().requires_grad_()
        loss = fn(sa, idx, v, y, reduction=reduction, **kw, **tf)
        s64 = s.to(F64).requires_grad_()
        want = independent_topk(s64, idx, v.to(F64), y, reduction=reduction, tf=tf, **kw)
        assert_close(loss, want, TOL_LOSS[dtype], f"loss ({reduction})")
        obj, w = _scalar(loss, gen)
        obj64 = want.sum() if w is None else (want * w).sum()
        g = torch.autograd.grad(obj, sa)[0]
        assert g.dtype == dtype
        assert_close(g, torch.autograd.grad(obj64, s64)[0], TOL_GRAD[dtype], f"grad ({reduction})")
        assert (g[masked] == 0).all() and (g[y == IGNORE] == 0).all()


@pytest.mark.parametrize("fn", TOPK_IMPLS)
def test_topk_defaults_bitwise(fn, gen):
    s, idx, v, y, _ = make_topk_inputs(gen, 5, 29, 4, torch.float32)
    for divergence in ("kl", "ce"):
        kw = _kd_options(gen, divergence)
        del kw["beta"]
        results = []
        for extra in (
            {},
            dict(student_logit_scale=1, teacher_logit_scale=1.0, teacher_softcap=None),
        ):
            sa = s.clone().requires_grad_()
            loss = fn(sa, idx, v, y, **kw, **extra)
            results.append((loss.detach(), torch.autograd.grad(loss, sa)[0]))
        assert all(torch.equal(a, b) for a, b in zip(*results))


# ---------------------------------------------------------------- option checks

BAD_VALUES = [
    (name, value)
    for name in ("student_softcap", "teacher_softcap")
    for value in (0.0, 0, -1.5, float("nan"), float("inf"), float("-inf"))
] + [
    (name, value)
    for name in ("student_logit_scale", "teacher_logit_scale")
    for value in (float("nan"), float("inf"), float("-inf"))
]
BAD_TYPES = [
    (name, value)
    for name in ("student_logit_scale", "teacher_logit_scale")
    for value in ("2", None, True, torch.tensor(2.0))
] + [
    (name, value)
    for name in ("student_softcap", "teacher_softcap")
    for value in ("2", True, torch.tensor(2.0), [1.0])
]
GOOD = [
    ("student_logit_scale", 0.0),
    ("teacher_logit_scale", -3.0),
    ("student_logit_scale", 2),
    ("teacher_softcap", 3),
    ("student_softcap", 1e-3),
]
_DEFAULTS = dict(
    student_logit_scale=1.0, teacher_logit_scale=1.0, student_softcap=None, teacher_softcap=None
)


def _call_each(fn, gen, **kw):
    if fn in [p.values[0] for p in TOPK_IMPLS]:
        s, idx, v, y, _ = make_topk_inputs(gen, 3, 11, 3, torch.float32)
        return fn(s, idx, v, y, **kw)
    s, t, y, _ = make_inputs(gen, (3,), 11, torch.float32)
    return fn(s, t, y, **kw)


def _assert_refused_as_checked(exc, fn, gen, name, value):
    """fn refuses name=value with check_logit_transform's exception and message, which names it."""
    with pytest.raises(exc) as info:
        check_logit_transform(**dict(_DEFAULTS, **{name: value}))
    msg = str(info.value)
    assert name in msg
    with pytest.raises(exc, match=re.escape(msg)):
        _call_each(fn, gen, **{name: value})


@pytest.mark.parametrize("fn", KD_IMPLS + TOPK_IMPLS)
@pytest.mark.parametrize(("name", "value"), BAD_VALUES, ids=[f"{n}={v}" for n, v in BAD_VALUES])
def test_bad_value(fn, name, value, gen):
    _assert_refused_as_checked(ValueError, fn, gen, name, value)


@pytest.mark.parametrize("fn", KD_IMPLS + TOPK_IMPLS)
@pytest.mark.parametrize(
    ("name", "value"), BAD_TYPES, ids=[f"{n}:{type(v).__name__}" for n, v in BAD_TYPES]
)
def test_bad_type(fn, name, value, gen):
    _assert_refused_as_checked(TypeError, fn, gen, name, value)


@pytest.mark.parametrize("fn", KD_IMPLS + TOPK_IMPLS)
@pytest.mark.parametrize(("name", "value"), GOOD, ids=[f"{n}={v}" for n, v in GOOD])
def test_accepted(fn, name, value, gen):
    check_logit_transform(**dict(_DEFAULTS, **{name: value}))
    loss = _call_each(fn, gen, **{name: value})
    assert torch.isfinite(loss)


@pytest.mark.parametrize("fn", KD_IMPLS)
def test_return_entropy_type(fn, gen):
    with pytest.raises(TypeError, match="return_entropy"):
        _call_each(fn, gen, return_entropy=1)
