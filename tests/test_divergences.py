"""The divergences added with `beta`: "reverse_kl", "jsd" (generalised Jensen-Shannon, weight
beta) and "tvd" (total variation), against the independent float64 oracle (tests/oracle.py):
temperatures 0.05 to 100, every beta end and inside point, V from 1 to 32000, every dtype, masked
vocabulary, teacher gradients, grad_output != 1, gradcheck, the beta = 0 / 1 end points (bitwise
the two KLs), TRL's formula of the generalised JSD, and the checks of beta.

Run against the fused op by default and against kdfused.reference with --kd-impl=reference.

Size: every divergence's oracle grid, limits and peer comparisons in one place.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch

from masked_inputs import (
    NEG_INF,
    all_inf_row,
    assert_masked_columns_clean,
    assert_padding_row_clean,
    labels_off_mask,
    masked_logits,
    padding_row,
)
from oracle import (
    assert_grad,
    assert_matches,
    check_against_oracle,
    loss_dtype_for,
    make_labels,
    make_logits,
    oracle,
    run_op,
)
from params import DT, ERRORS, REDUCTIONS, ctx
from trl_jsd import generalized_jsd_per_token

BETAS = [0.0, 0.1, 0.5, 0.9, 1.0]
# (divergence, beta): every new divergence, the JSD at every beta
CASES = [pytest.param("reverse_kl", 0.5, id="reverse_kl"), pytest.param("tvd", 0.5, id="tvd")] + [
    pytest.param("jsd", b, id=f"jsd-beta{b:g}") for b in BETAS
]
# JSD inside (0, 1) only: the code path that is neither KL
INNER = [
    pytest.param("reverse_kl", 0.5, id="reverse_kl"),
    pytest.param("tvd", 0.5, id="tvd"),
    pytest.param("jsd", 0.1, id="jsd-beta0.1"),
    pytest.param("jsd", 0.5, id="jsd-beta0.5"),
    pytest.param("jsd", 0.9, id="jsd-beta0.9"),
]


_run = functools.partial(run_op, grad_teacher=True)


# ------------------------------------------------------------------------------------------------
# against the oracle
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DT)
@pytest.mark.parametrize("temperature", [0.05, 1.0, 4.0, 100.0])
@pytest.mark.parametrize("divergence,beta", CASES)
def test_grid(kd_loss, device, gen, seed, divergence, beta, temperature, dtype):
    """Loss and both gradients, every reduction, soft + hard (soft only: the other tests)."""
    shape = (2, 3, 37)
    s = make_logits(shape, dtype, device, gen, scale=3.0)
    t = make_logits(shape, dtype, device, gen, scale=3.0)
    labels = make_labels(shape[:-1], shape[-1], device, gen, 0.3)
    for reduction in REDUCTIONS:
        kw = dict(
            temperature=temperature,
            soft_weight=0.7,
            hard_weight=0.3,
            divergence=divergence,
            beta=beta,
            reduction=reduction,
        )
        check_against_oracle(kd_loss, s, t, labels, grad_teacher=True, ctx=ctx(seed, **kw), **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("divergence,beta", INNER)
@pytest.mark.parametrize("V", [1, 2, 7, 1025, 4099, 32000])
def test_vocab_sizes(kd_loss, device, gen, seed, V, divergence, beta, dtype):
    N = 4 if V <= 4099 else 2
    s = make_logits((N, V), dtype, device, gen, scale=2.0)
    t = make_logits((N, V), dtype, device, gen, scale=2.0)
    labels = make_labels((N,), V, device, gen, 0.2)
    kw = dict(temperature=2.0, soft_weight=0.9, hard_weight=0.1, divergence=divergence, beta=beta)
    check_against_oracle(kd_loss, s, t, labels, grad_teacher=True, ctx=ctx(seed, V=V, **kw), **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("temperature", [0.05, 1.0, 100.0])
@pytest.mark.parametrize("divergence,beta", INNER)
def test_huge_logits(kd_loss, device, gen, seed, divergence, beta, temperature, dtype):
    """Logits ~1e4 with a large common offset, student and teacher offset in opposite
    directions: computed relative to each row's maximum, nothing is lost (float64 tolerance for
    float64 inputs)."""
    N, V = 4, 300
    s = (torch.randn((N, V), generator=gen, dtype=torch.float64) * 3 + 1e4).to(dtype).to(device)
    t = (torch.randn((N, V), generator=gen, dtype=torch.float64) * 3 - 1e4).to(dtype).to(device)
    kw = dict(temperature=temperature, divergence=divergence, beta=beta, reduction="none")
    loss, gs, gt, _ = check_against_oracle(
        kd_loss, s, t, None, grad_teacher=True, ctx=ctx(seed, **kw), **kw
    )
    assert torch.isfinite(loss).all() and torch.isfinite(gs).all() and torch.isfinite(gt).all()


@pytest.mark.parametrize("dtype", DT)
@pytest.mark.parametrize("divergence,beta", CASES)
def test_grad_output(kd_loss, device, gen, seed, divergence, beta, dtype):
    """loss.backward(w) with a random per-row w ("none") and a scalar c ("sum", "mean")."""
    s = make_logits((3, 4, 29), dtype, device, gen)
    t = make_logits((3, 4, 29), dtype, device, gen)
    labels = make_labels((3, 4), 29, device, gen, 0.25)
    ldt = loss_dtype_for(dtype, dtype)
    base = dict(temperature=2.5, soft_weight=0.7, hard_weight=0.3, divergence=divergence, beta=beta)
    w = (torch.randn((3, 4), generator=gen, dtype=torch.float64) * 2).to(ldt).to(device)
    kw = dict(base, reduction="none")
    check_against_oracle(
        kd_loss, s, t, labels, grad_teacher=True, grad_output=w, ctx=ctx(seed, **kw), **kw
    )
    for reduction, c in [("sum", -0.3), ("mean", 3.7)]:
        kw = dict(base, reduction=reduction)
        go = torch.tensor(c, dtype=ldt, device=device)
        check_against_oracle(
            kd_loss, s, t, labels, grad_teacher=True, grad_output=go, ctx=ctx(seed, c=c, **kw), **kw
        )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("divergence,beta", INNER)
def test_teacher_only_requires_grad(kd_loss, device, gen, seed, divergence, beta, dtype):
    """Online distillation: only the teacher requires grad; its gradient is the oracle's."""
    s = make_logits((5, 40), dtype, device, gen)
    t = make_logits((5, 40), dtype, device, gen).requires_grad_(True)
    kw = dict(temperature=3.0, divergence=divergence, beta=beta)
    loss = kd_loss(s, t, None, **kw)
    loss.backward()
    ref = oracle(s, t, None, **kw)
    assert_grad(t.grad, ref, "teacher", t, ctx=ctx(seed, **kw))


# ------------------------------------------------------------------------------------------------
# masked vocabulary, ignored rows, zero weights
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DT)
@pytest.mark.parametrize("divergence,beta", CASES)
@pytest.mark.parametrize("V", [13, 1500])
def test_masked_vocab_both(kd_loss, device, gen, seed, V, divergence, beta, dtype):
    """The same columns -inf in student and teacher contribute nothing: finite loss equal to the
    oracle, gradients exactly 0 there, no NaN anywhere."""
    mask, s, t = masked_logits(5, V, dtype, device, gen, 0.4)
    kw = dict(temperature=2.0, divergence=divergence, beta=beta, reduction="none")
    loss, gs, gt, _ = check_against_oracle(
        kd_loss, s, t, None, grad_teacher=True, ctx=ctx(seed, V=V, **kw), **kw
    )
    assert_masked_columns_clean(loss, gs, gt, mask)


@pytest.mark.parametrize("side", ["teacher", "student"])
@pytest.mark.parametrize("divergence,beta", CASES)
def test_mass_against_masked_logit(kd_loss, device, gen, seed, divergence, beta, side):
    """One side -inf where the other has mass: KL(p || q) is +inf when the student is -inf under
    teacher mass, KL(q || p) when the teacher is -inf under student mass; otherwise (the other
    KL, JSD, TVD) the loss is finite and the oracle's, gradients included, and log(q/m) at q = 0
    contributes 0. Other rows are unaffected."""
    N, V = 4, 30
    s = make_logits((N, V), torch.float64, device, gen)
    t = make_logits((N, V), torch.float64, device, gen)
    cols = torch.tensor([3, 7, 8], device=device)
    (t if side == "teacher" else s)[1, cols] = NEG_INF
    eff = divergence
    if divergence == "jsd" and beta in (0.0, 1.0):
        eff = "kl" if beta == 0.0 else "reverse_kl"
    infinite = (eff == "kl" and side == "student") or (eff == "reverse_kl" and side == "teacher")
    kw = dict(temperature=2.0, divergence=divergence, beta=beta, reduction="none")
    if infinite:
        rows = kd_loss(s, t, None, **kw)
        assert rows[1].item() == math.inf, rows
        ok = [0, 2, 3]
        ref = oracle(s[ok], t[ok], None, **kw)
        assert_matches(
            rows[ok],
            ref.loss,
            ref.loss_err,
            out_dtype=rows.dtype,
            V=V,
            acc=torch.float64,
            what="other rows",
            ctx=ctx(seed, **kw),
        )
        for reduction in ["batchmean", "sum"]:
            assert kd_loss(s, t, None, **dict(kw, reduction=reduction)).item() == math.inf
    else:
        loss, gs, gt, _ = check_against_oracle(
            kd_loss, s, t, None, grad_teacher=True, ctx=ctx(seed, side=side, **kw), **kw
        )
        assert torch.isfinite(loss).all() and torch.isfinite(gs).all()
        assert torch.isfinite(gt).all()


@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
@pytest.mark.parametrize("divergence,beta", CASES)
def test_ignored_all_inf_row(kd_loss, device, gen, seed, divergence, beta, reduction):
    """An ignored row that is -inf everywhere (padding) gives 0 loss and exactly 0 gradient;
    no NaN anywhere."""
    s, t, labels = padding_row(4, 40, torch.float32, device, gen, 2)
    kw = dict(
        temperature=2.0,
        soft_weight=0.6,
        hard_weight=0.4,
        divergence=divergence,
        beta=beta,
        reduction=reduction,
    )
    loss, gs, gt = _run(kd_loss, s, t, labels, **kw)
    assert_padding_row_clean(loss, gs, gt, 2)
    check_against_oracle(kd_loss, s, t, labels, grad_teacher=True, ctx=ctx(seed, **kw), **kw)


@pytest.mark.parametrize("divergence,beta", INNER)
def test_all_inf_row_is_nan(kd_loss, device, gen, seed, divergence, beta):
    """A valid row that is -inf everywhere has no distribution: NaN, like softmax."""
    s, t = all_inf_row(3, 20, torch.float32, device, gen, 1)
    rows = kd_loss(s, t, None, divergence=divergence, beta=beta, reduction="none")
    assert torch.isnan(rows[1]) and torch.isfinite(rows[[0, 2]]).all(), rows


@pytest.mark.parametrize("divergence,beta", INNER)
def test_zero_soft_weight_never_touches_teacher(kd_loss, device, gen, seed, divergence, beta):
    """soft_weight == 0: the divergence is not computed, whatever the teacher holds."""
    s = make_logits((6, 25), torch.float32, device, gen)
    labels = make_labels((6,), 25, device, gen, 0.2)
    kw = dict(temperature=3.0, soft_weight=0.0, hard_weight=1.0, divergence=divergence, beta=beta)
    for bad in [NEG_INF, math.inf, math.nan]:
        t = torch.full((6, 25), bad, device=device)
        loss, gs, gt = _run(kd_loss, s, t, labels, **kw)
        assert torch.isfinite(loss) and torch.isfinite(gs).all(), (bad, loss)
        assert gt is None or (gt == 0).all(), (bad, gt)
        ref = oracle(s, torch.zeros_like(t), labels, **kw)
        assert_matches(
            loss,
            ref.loss,
            ref.loss_err,
            out_dtype=torch.float32,
            V=25,
            acc=torch.float32,
            what=f"loss (teacher {bad})",
            ctx=ctx(seed, **kw),
        )


# ------------------------------------------------------------------------------------------------
# identities
# ------------------------------------------------------------------------------------------------


def _bits(x: torch.Tensor) -> torch.Tensor:
    x = x.detach().contiguous()
    return x.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[x.element_size()])


@pytest.mark.parametrize("dtype", DT)
@pytest.mark.parametrize("reduction", ["batchmean", "none"])
@pytest.mark.parametrize("end,same", [(0.0, "kl"), (1.0, "reverse_kl")])
def test_jsd_end_points_are_the_kls(kd_loss, device, gen, seed, end, same, reduction, dtype):
    """JSD at beta = 0 is KL(p || q) and at beta = 1 KL(q || p): bitwise the same loss and
    gradients as "kl" / "reverse_kl" (the same code path), masked columns included."""
    N, V = 6, 300
    mask, s, t = masked_logits(N, V, dtype, device, gen, 0.2)
    labels = labels_off_mask(make_labels((N,), V, device, gen, 0.3), mask)
    kw = dict(temperature=1.5, soft_weight=0.8, hard_weight=0.2, reduction=reduction)
    a = _run(kd_loss, s, t, labels, divergence="jsd", beta=end, **kw)
    b = _run(kd_loss, s, t, labels, divergence=same, beta=0.5, **kw)
    for x, y, what in zip(a, b, ["loss", "grad_student", "grad_teacher"]):
        assert torch.equal(_bits(x), _bits(y)), f"{what}: jsd(beta={end}) != {same}{ctx(seed)}"
    assert torch.isfinite(a[0]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_reverse_kl_is_kl_swapped(kd_loss, device, gen, seed, dtype):
    """reverse_kl(s, t) = kl(t, s): the same row losses, and the gradients trade places."""
    s = make_logits((5, 70), dtype, device, gen)
    t = make_logits((5, 70), dtype, device, gen)
    kw = dict(temperature=2.0, reduction="none")
    lr, gs_r, gt_r = _run(kd_loss, s, t, divergence="reverse_kl", **kw)
    lk, gs_k, gt_k = _run(kd_loss, t, s, divergence="kl", **kw)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(lr, lk, **tol)
    torch.testing.assert_close(gs_r, gt_k, **tol)
    torch.testing.assert_close(gt_r, gs_k, **tol)


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_jsd_swap_symmetry(kd_loss, device, gen, seed, beta):
    """JSD_beta(p, q) = JSD_(1-beta)(q, p); JSD_0.5 is symmetric and at most log 2."""
    s = make_logits((5, 70), torch.float64, device, gen)
    t = make_logits((5, 70), torch.float64, device, gen)
    kw = dict(temperature=2.0, divergence="jsd", reduction="none")
    a = kd_loss(s, t, None, beta=beta, **kw)
    b = kd_loss(t, s, None, beta=1.0 - beta, **kw)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    assert (a >= 0).all() and (a / 4.0 <= math.log(2) + 1e-12).all()  # T^2 = 4


@pytest.mark.parametrize("dtype", DT)
def test_tvd_zero_subgradient_where_equal(kd_loss, device, gen, seed, dtype):
    """Identical student and teacher (p == q everywhere): TVD 0 and both gradients exactly 0
    (the subgradient of |x| at 0)."""
    s = make_logits((4, 50), dtype, device, gen)
    loss, gs, gt = _run(
        kd_loss, s, s.clone(), None, temperature=2.0, divergence="tvd", reduction="none"
    )
    assert (loss == 0).all(), loss
    assert (gs == 0).all() and (gt == 0).all()


def test_trl_generalized_jsd_formula(kd_loss, device, gen, seed):
    """TRL's generalized_jsd_loss (the GKD trainer's, written out in tests/trl_jsd.py with its
    log-space mixture through logsumexp), at beta = 0.5: kd_loss(divergence="jsd",
    reduction="none") is T^2 times its per-token loss (TRL tempers both logits and does not scale
    by T^2), and the student gradients agree likewise."""
    T, beta = 2.0, 0.5
    s = make_logits((6, 200), torch.float64, device, gen)
    t = make_logits((6, 200), torch.float64, device, gen)
    sr = s.clone().requires_grad_(True)
    trl = generalized_jsd_per_token(sr.cpu(), t.cpu(), beta, T)
    trl.sum().backward()
    loss, gs, _ = _run(
        kd_loss, s, t, None, temperature=T, divergence="jsd", beta=beta, reduction="none"
    )
    torch.testing.assert_close(loss.cpu(), T * T * trl.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gs.cpu(), T * T * sr.grad.cpu(), rtol=1e-9, atol=1e-12)


# ------------------------------------------------------------------------------------------------
# gradcheck
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["batchmean", "none"])
@pytest.mark.parametrize("divergence,beta", CASES)
def test_gradcheck(kd_loss, device, gen, seed, divergence, beta, reduction):
    """float64 finite differences, both inputs, soft + hard. (TVD: random logits have no ties
    p_k == q_k, where |x| has a kink.)"""
    s = make_logits((3, 5), torch.float64, device, gen, scale=1.5).requires_grad_(True)
    t = make_logits((3, 5), torch.float64, device, gen, scale=1.5).requires_grad_(True)
    labels = make_labels((3,), 5, device, gen, 0.3)
    labels[0] = 1
    kw = dict(
        temperature=1.7,
        soft_weight=0.8,
        hard_weight=0.4,
        divergence=divergence,
        beta=beta,
        reduction=reduction,
    )
    assert torch.autograd.gradcheck(
        lambda a, b: kd_loss(a, b, labels, **kw), (s, t), eps=1e-6, atol=1e-7, rtol=1e-5
    )


# ------------------------------------------------------------------------------------------------
# beta: checks and the module
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("beta", [-0.1, 1.0 + 1e-9, math.nan, math.inf, -math.inf])
def test_beta_out_of_range(kd_loss, beta):
    s, t = torch.randn(3, 10), torch.randn(3, 10)
    with pytest.raises(ValueError, match=r"kdfused: beta must be in \[0, 1\], got "):
        kd_loss(s, t, None, divergence="jsd", beta=beta)


@pytest.mark.parametrize("beta", ["0.5", None, torch.tensor(0.5), True])
def test_beta_not_a_number(kd_loss, beta):
    s, t = torch.randn(3, 10), torch.randn(3, 10)
    with pytest.raises(TypeError, match="beta"):
        kd_loss(s, t, None, divergence="jsd", beta=beta)


def test_beta_checked_for_every_divergence(kd_loss):
    """beta is an option of the loss: out of range is an error even when unused."""
    s, t = torch.randn(3, 10), torch.randn(3, 10)
    for divergence in ["kl", "ce", "reverse_kl", "tvd"]:
        with pytest.raises(ERRORS, match="beta"):
            kd_loss(s, t, None, divergence=divergence, beta=2.0)


@pytest.mark.fused_only
@pytest.mark.parametrize("divergence,beta", INNER)
def test_module_beta(kdfused_mod, device, gen, seed, divergence, beta):
    crit = kdfused_mod.KDLoss(temperature=2.0, divergence=divergence, beta=beta)
    assert f"beta={beta}" in repr(crit)
    s = make_logits((4, 30), torch.float32, device, gen)
    t = make_logits((4, 30), torch.float32, device, gen)
    got = crit(s, t)
    want = kdfused_mod.kd_loss(s, t, temperature=2.0, divergence=divergence, beta=beta)
    assert torch.equal(got, want)


@pytest.mark.fused_only
@pytest.mark.parametrize("bad,exc", [(dict(beta=1.5), ValueError), (dict(beta="x"), TypeError)])
def test_module_bad_beta(kdfused_mod, bad, exc):
    with pytest.raises(exc, match="beta"):
        kdfused_mod.KDLoss(divergence="jsd", **bad)
