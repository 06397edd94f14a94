"""Numerical rules (docs/design.md section 1): masked vocabulary (-inf), +inf and NaN rules,
weights that are exactly 0, huge logits, extreme temperatures."""

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
    check_against_oracle,
    make_labels,
    make_logits,
    oracle,
    random_mask,
    run_op,
)
from params import DT
from params import ctx as _ctx

_run = functools.partial(run_op, grad_teacher=True)


# ------------------------------------------------------------------------------------------------
# masked vocabulary
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DT)
@pytest.mark.parametrize("divergence", ["kl", "ce"])
@pytest.mark.parametrize("temperature", [0.5, 4.0])
@pytest.mark.parametrize("V", [13, 1500])
def test_masked_vocab_both(kd_loss, device, gen, seed, V, temperature, divergence, dtype):
    """The same positions masked (-inf) in student and teacher: finite loss equal to the oracle,
    gradients exactly 0 at the masked positions, no NaN anywhere."""
    N = 6
    mask, s, t = masked_logits(N, V, dtype, device, gen, 0.4)
    labels = labels_off_mask(make_labels((N,), V, device, gen, 0.0), mask)
    kw = dict(temperature=temperature, soft_weight=0.8, hard_weight=0.2, divergence=divergence)
    loss, gs, gt, _ = check_against_oracle(
        kd_loss, s, t, labels, grad_teacher=True, ctx=_ctx(seed, V=V, **kw), **kw
    )
    assert_masked_columns_clean(loss, gs, gt, mask)


@pytest.mark.parametrize("dtype", DT)
@pytest.mark.parametrize("divergence", ["kl", "ce"])
def test_masked_teacher_only(kd_loss, device, gen, seed, divergence, dtype):
    """Teacher -inf where the student is finite: p = 0 there, no NaN (0 * -inf guarded)."""
    N, V = 5, 77
    mask = random_mask(N, V, gen, 0.5, device)
    s = make_logits((N, V), dtype, device, gen)
    t = make_logits((N, V), dtype, device, gen).masked_fill(mask, NEG_INF)
    kw = dict(temperature=2.0, divergence=divergence, reduction="none")
    loss, gs, gt, _ = check_against_oracle(
        kd_loss, s, t, None, grad_teacher=True, ctx=_ctx(seed, **kw), **kw
    )
    assert torch.isfinite(loss).all() and torch.isfinite(gs).all() and torch.isfinite(gt).all()
    assert (gt[mask] == 0).all()


@pytest.mark.parametrize("dtype", DT)
@pytest.mark.parametrize("divergence", ["kl", "ce"])
def test_masked_student_only_where_teacher_has_no_mass(
    kd_loss, device, gen, seed, divergence, dtype
):
    """Student -inf only where the teacher is -inf as well, teacher masked in more places."""
    N, V = 5, 64
    tmask = random_mask(N, V, gen, 0.5, device)
    smask = tmask & (torch.rand((N, V), generator=gen) < 0.5).to(device)
    s = make_logits((N, V), dtype, device, gen).masked_fill(smask, NEG_INF)
    t = make_logits((N, V), dtype, device, gen).masked_fill(tmask, NEG_INF)
    kw = dict(temperature=1.0, divergence=divergence, reduction="sum")
    loss, gs, gt, _ = check_against_oracle(
        kd_loss, s, t, None, grad_teacher=True, ctx=_ctx(seed, **kw), **kw
    )
    assert torch.isfinite(loss).all()


@pytest.mark.parametrize("dtype", DT)
@pytest.mark.parametrize("divergence", ["kl", "ce"])
def test_student_inf_under_teacher_mass_is_inf(kd_loss, device, gen, seed, divergence, dtype):
    """Student -inf where the teacher has mass: that row's loss is +inf (not NaN); other rows
    are unaffected (loss and gradients) with reduction="none"; reduced losses are +inf."""
    N, V = 4, 30
    s = make_logits((N, V), dtype, device, gen)
    t = make_logits((N, V), dtype, device, gen)
    s[1, 7] = NEG_INF
    kw = dict(temperature=2.0, divergence=divergence)
    for reduction in ["batchmean", "mean", "sum"]:
        loss = kd_loss(s, t, None, reduction=reduction, **kw)
        assert loss.item() == math.inf, f"{reduction}: expected +inf, got {loss.item()}"
    ldt = torch.float64 if dtype == torch.float64 else torch.float32
    go = (torch.rand(N, generator=gen, dtype=torch.float64) + 0.5).to(ldt).to(device)
    loss, gs, gt = _run(kd_loss, s, t, None, grad_output=go, reduction="none", **kw)
    assert loss[1].item() == math.inf, loss
    ok = torch.tensor([0, 2, 3], device=device)
    ref = oracle(s, t, None, reduction="none", grad_output=go, **kw)
    from oracle import acc_dtype, assert_matches

    acc = acc_dtype(s.dtype, t.dtype)
    assert_matches(
        loss[ok],
        ref.loss[ok.cpu()],
        ref.loss_err[ok.cpu()],
        out_dtype=loss.dtype,
        V=V,
        acc=acc,
        what="loss (other rows)",
        ctx=_ctx(seed),
    )
    cmp = dict(acc=acc, rows=ok, what="(other rows)", ctx=_ctx(seed), roundings=2)
    assert_grad(gs, ref, "student", s, **cmp)
    assert_grad(gt, ref, "teacher", t, **cmp)


@pytest.mark.parametrize("dtype", DT)
def test_all_inf_row_is_nan(kd_loss, device, gen, seed, dtype):
    """A row entirely -inf (student and teacher) is NaN, as softmax; the other rows of a
    reduction="none" result are unaffected; reduced losses are NaN."""
    N, V = 4, 40
    s, t = all_inf_row(N, V, dtype, device, gen, 2)
    rows = kd_loss(s, t, None, temperature=2.0, reduction="none")
    assert torch.isnan(rows[2]), rows
    ref = oracle(s, t, None, temperature=2.0, reduction="none")
    from oracle import acc_dtype, assert_matches

    assert_matches(
        rows[[0, 1, 3]],
        ref.loss[[0, 1, 3]],
        ref.loss_err[[0, 1, 3]],
        out_dtype=rows.dtype,
        V=V,
        acc=acc_dtype(dtype),
        what="other rows",
    )
    for reduction in ["batchmean", "mean", "sum"]:
        loss = kd_loss(s, t, None, temperature=2.0, reduction=reduction)
        assert torch.isnan(loss), f"{reduction}: expected NaN, got {loss.item()}"


@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
@pytest.mark.parametrize("dtype", DT)
def test_all_inf_row_ignored(kd_loss, device, gen, seed, dtype, reduction):
    """An ignored row contributes 0 to the loss and 0 to every gradient even if it is entirely
    -inf (e.g. padding): no NaN leaks into the loss or into any gradient."""
    s, t, labels = padding_row(4, 40, dtype, device, gen, 2)
    kw = dict(temperature=2.0, soft_weight=0.6, hard_weight=0.4, reduction=reduction)
    loss, gs, gt = _run(kd_loss, s, t, labels, **kw)
    assert_padding_row_clean(loss, gs, gt, 2)
    check_against_oracle(kd_loss, s, t, labels, grad_teacher=True, ctx=_ctx(seed), **kw)


@pytest.mark.parametrize("dtype", DT)
def test_zero_soft_weight_never_touches_teacher(kd_loss, device, gen, seed, dtype):
    """soft_weight == 0: the soft term is not computed, so a teacher that is all -inf, +inf or
    NaN cannot inject inf/NaN; the loss is the hard CE; the teacher gradient is 0 (or None)."""
    N, V = 6, 25
    s = make_logits((N, V), dtype, device, gen)
    labels = make_labels((N,), V, device, gen, 0.2)
    for bad in [NEG_INF, math.inf, math.nan]:
        t = torch.full((N, V), bad, dtype=dtype, device=device)
        for reduction in ["batchmean", "none"]:
            kw = dict(temperature=3.0, soft_weight=0.0, hard_weight=1.0, reduction=reduction)
            loss, gs, gt = _run(kd_loss, s, t, labels, **kw)
            assert torch.isfinite(loss).all(), (bad, reduction, loss)
            assert torch.isfinite(gs).all()
            assert gt is None or (gt == 0).all(), (bad, gt)
            check_against_oracle(
                kd_loss, s, torch.zeros_like(t), labels, ctx=_ctx(seed, bad=bad), **kw
            )
            ref = oracle(s, torch.zeros_like(t), labels, **kw)
            torch.testing.assert_close(loss.double().cpu(), ref.loss, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype", DT)
def test_zero_hard_weight_ignores_label_position(kd_loss, device, gen, seed, dtype):
    """hard_weight == 0: the hard term is not computed, so a label that points at a masked
    (-inf) student logit does not make the loss infinite."""
    N, V = 5, 20
    s = make_logits((N, V), dtype, device, gen)
    t = make_logits((N, V), dtype, device, gen)
    labels = make_labels((N,), V, device, gen, 0.0)
    s[torch.arange(N, device=device), labels] = NEG_INF
    t[torch.arange(N, device=device), labels] = NEG_INF
    kw = dict(temperature=2.0, soft_weight=1.0, hard_weight=0.0)
    loss, gs, gt, _ = check_against_oracle(
        kd_loss, s, t, labels, grad_teacher=True, ctx=_ctx(seed), **kw
    )
    assert torch.isfinite(loss) and torch.isfinite(gs).all() and torch.isfinite(gt).all()


def test_hard_label_at_masked_student_is_inf(kd_loss, device, gen):
    """hard_weight > 0 and the label's student logit is -inf: hard CE = +inf."""
    s = make_logits((3, 10), torch.float32, device, gen)
    t = make_logits((3, 10), torch.float32, device, gen)
    labels = torch.tensor([1, 2, 3], device=device)
    s[0, 1] = NEG_INF
    rows = kd_loss(s, t, labels, soft_weight=0.0, hard_weight=1.0, reduction="none")
    assert rows[0].item() == math.inf and torch.isfinite(rows[1:]).all(), rows


# ------------------------------------------------------------------------------------------------
# huge logits and extreme temperatures
# ------------------------------------------------------------------------------------------------

HUGE_CASES = {
    # independent, spread ~1e4: nearly one-hot distributions, KL ~ 1e4
    "spread": lambda x, y: (x * 1e4, y * 1e4),
    # large common offset, ordinary spread: loss must equal that of the unshifted logits
    "offset+": lambda x, y: (x * 3 + 1e4, y * 3 + 1e4),
    "offset-": lambda x, y: (x * 3 - 1e4, y * 3 - 1e4),
    # student and teacher offset in opposite directions (the loss is shift invariant per row)
    "opposite": lambda x, y: (x * 3 + 1e4, y * 3 - 1e4),
}


@pytest.mark.parametrize("dtype", DT)
@pytest.mark.parametrize("temperature", [0.05, 1.0, 4.0, 100.0])
@pytest.mark.parametrize("case", list(HUGE_CASES))
@pytest.mark.parametrize("divergence", ["kl", "ce"])
def test_huge_logits(kd_loss, device, gen, seed, case, temperature, dtype, divergence):
    N, V = 6, 500
    x = torch.randn((N, V), generator=gen, dtype=torch.float64)
    y = torch.randn((N, V), generator=gen, dtype=torch.float64)
    s, t = HUGE_CASES[case](x, y)
    s, t = s.to(dtype).to(device), t.to(dtype).to(device)
    labels = make_labels((N,), V, device, gen, 0.2)
    kw = dict(temperature=temperature, soft_weight=0.7, hard_weight=0.3, divergence=divergence)
    loss, gs, gt, _ = check_against_oracle(
        kd_loss, s, t, labels, grad_teacher=True, ctx=_ctx(seed, case=case, **kw), **kw
    )
    assert torch.isfinite(loss) and torch.isfinite(gs).all() and torch.isfinite(gt).all()


@pytest.mark.parametrize("dtype", DT)
@pytest.mark.parametrize("temperature", [0.05, 100.0])
@pytest.mark.parametrize("reduction", ["batchmean", "none"])
@pytest.mark.parametrize("divergence", ["kl", "ce"])
def test_extreme_temperature(kd_loss, device, gen, seed, temperature, reduction, divergence, dtype):
    N, V = 8, 700
    s = make_logits((N, V), dtype, device, gen, scale=3.0)
    t = make_logits((N, V), dtype, device, gen, scale=3.0)
    labels = make_labels((N,), V, device, gen, 0.2)
    kw = dict(
        temperature=temperature,
        soft_weight=0.9,
        hard_weight=0.1,
        divergence=divergence,
        reduction=reduction,
    )
    loss, gs, gt, _ = check_against_oracle(
        kd_loss, s, t, labels, grad_teacher=True, ctx=_ctx(seed, **kw), **kw
    )
    assert torch.isfinite(loss).all() and torch.isfinite(gs).all() and torch.isfinite(gt).all()


@pytest.mark.parametrize("dtype", DT)
def test_high_temperature_relative_accuracy(kd_loss, device, gen, seed, dtype):
    """T = 100: soft loss T^2 KL is O(1) although KL ~ 1e-4; it must be accurate to 1% relative
    (a float32 log-sum-exp of ~log V carries ~1e-7 relative error, times T^2 = 1e4)."""
    N, V = 8, 700
    s = make_logits((N, V), dtype, device, gen, scale=3.0)
    t = make_logits((N, V), dtype, device, gen, scale=3.0)
    for divergence in ["kl", "ce"]:
        kw = dict(temperature=100.0, divergence=divergence, reduction="none")
        rows = kd_loss(s, t, None, **kw)
        ref = oracle(s, t, None, **kw).loss
        where = f"{divergence} seed={seed}"
        torch.testing.assert_close(
            rows.double().cpu(), ref, rtol=1e-2, atol=0, msg=lambda m, where=where: f"{where}: {m}"
        )


@pytest.mark.parametrize("dtype", DT)
def test_shift_invariance(kd_loss, device, gen, seed, dtype):
    """Adding a per-row constant to the logits changes neither loss nor gradients (exactly
    representable shifts, so the shifted inputs hold the same information)."""
    N, V = 4, 300
    s = make_logits((N, V), dtype, device, gen, scale=2.0)
    t = make_logits((N, V), dtype, device, gen, scale=2.0)
    labels = make_labels((N,), V, device, gen, 0.0)
    shifts = [0.0, 32.0, -64.0, 96.0] if dtype == torch.bfloat16 else [0.0, 64.0, -128.0, 512.0]
    shift = torch.tensor(shifts, device=device, dtype=dtype).unsqueeze(1)
    # multiples of 1/2 keep the shifted values exactly representable in every dtype
    s = (s * 2).round() / 2
    t = (t * 2).round() / 2
    kw = dict(temperature=2.0, soft_weight=0.5, hard_weight=0.5, reduction="none")
    l0, gs0, gt0 = _run(kd_loss, s, t, labels, **kw)
    l1, gs1, gt1 = _run(kd_loss, s + shift, t - shift, labels, **kw)
    assert torch.equal(s + shift - shift, s) and torch.equal(t - shift + shift, t)
    rt = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float32: 1e-4, torch.float64: 1e-10}
    torch.testing.assert_close(l1, l0, rtol=1e-4 if dtype != torch.float64 else 1e-10, atol=1e-4)
    torch.testing.assert_close(
        gs1.double(), gs0.double(), rtol=rt[dtype], atol=rt[dtype] * gs0.abs().max().item()
    )
    torch.testing.assert_close(
        gt1.double(), gt0.double(), rtol=rt[dtype], atol=rt[dtype] * gt0.abs().max().item()
    )


def test_one_hot_teacher(kd_loss, device, gen, seed):
    """A teacher so peaked that all but one probability underflow to 0 (p log p = 0 * -inf
    must be guarded): KL = -log q_y, CE the same. The teacher's logits are ~1e4 away from the
    student's: an evaluation that forms sum p (t - s) / T and subtracts (max t - max s) / T cancels
    two ~1e4 numbers (float32: ~1e-3 absolute); log p - log q from row-max-relative logits does
    not (what the 1e-5 relative tolerance asks for)."""
    N, V = 3, 100
    s = make_logits((N, V), torch.float32, device, gen)
    t = torch.zeros((N, V), device=device)
    t[:, 5] = 1e4
    for divergence in ["kl", "ce"]:
        kw = dict(temperature=1.0, divergence=divergence, reduction="none")
        loss, gs, gt, _ = check_against_oracle(
            kd_loss, s, t, None, grad_teacher=True, ctx=_ctx(seed, divergence=divergence), **kw
        )
        expect = -torch.log_softmax(s.double().cpu(), -1)[:, 5]
        torch.testing.assert_close(loss.double().cpu(), expect, rtol=1e-5, atol=1e-5)


def test_vocab_one(kd_loss, device, gen):
    """V = 1: every distribution is [1]; all losses and gradients are exactly 0."""
    s = make_logits((4, 1), torch.float32, device, gen)
    t = make_logits((4, 1), torch.float32, device, gen)
    labels = torch.zeros(4, dtype=torch.int64, device=device)
    for divergence in ["kl", "ce"]:
        loss, gs, gt = _run(
            kd_loss,
            s,
            t,
            labels,
            temperature=3.0,
            soft_weight=0.5,
            hard_weight=0.5,
            divergence=divergence,
            reduction="none",
        )
        assert (loss == 0).all() and (gs == 0).all() and (gt == 0).all(), (loss, gs, gt)
