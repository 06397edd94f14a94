"""Semantics of kd_loss against the independent float64 oracle (tests/oracle.py).

Loss value, dtype and shape and both gradients, for every divergence x reduction x weights x
temperature x dtype, for many vocabulary sizes (including every size around the vector and chunk
widths a kernel may use), 3-D inputs and Liger-style odd shapes.
"""

from __future__ import annotations

import pytest
import torch

from oracle import check_against_oracle, make_labels, make_logits
from params import CLASSIC_DIVERGENCES as DIVERGENCES
from params import DT, REDUCTIONS
from params import ctx as _ctx

TEMPERATURES = [0.5, 1.0, 4.0, 20.0]
# (soft_weight, hard_weight, labels?)  hard_weight > 0 needs labels; labels with hard_weight == 0
# still select the valid rows.
WEIGHTS = [
    pytest.param(1.0, 0.0, False, id="soft-nolabels"),
    pytest.param(1.0, 0.0, True, id="soft-labels"),
    pytest.param(0.9, 0.1, True, id="mix"),
    pytest.param(0.0, 1.0, True, id="hard"),
    pytest.param(0.5, 2.0, True, id="mix2"),
]


@pytest.mark.parametrize("dtype", DT)
@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("soft_weight,hard_weight,with_labels", WEIGHTS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_grid(
    kd_loss,
    device,
    gen,
    seed,
    divergence,
    reduction,
    soft_weight,
    hard_weight,
    with_labels,
    temperature,
    dtype,
):
    shape = (2, 3, 37)
    s = make_logits(shape, dtype, device, gen, scale=3.0)
    t = make_logits(shape, dtype, device, gen, scale=3.0)
    labels = make_labels(shape[:-1], shape[-1], device, gen, 0.3) if with_labels else None
    kw = dict(
        temperature=temperature,
        soft_weight=soft_weight,
        hard_weight=hard_weight,
        divergence=divergence,
        reduction=reduction,
    )
    check_against_oracle(
        kd_loss, s, t, labels, grad_teacher=True, ctx=_ctx(seed, shape=shape, **kw), **kw
    )


def _rows_for(V):
    return 6 if V <= 1025 else (3 if V <= 4099 else 2)


@pytest.mark.parametrize("dtype", DT)
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("V", [1, 2, 7, 1025, 4099, 32000])
def test_vocab_sizes(kd_loss, device, gen, seed, V, divergence, dtype):
    N = _rows_for(V)
    s = make_logits((N, V), dtype, device, gen, scale=2.0)
    t = make_logits((N, V), dtype, device, gen, scale=2.0)
    labels = make_labels((N,), V, device, gen, 0.2)
    kw = dict(temperature=4.0, soft_weight=0.9, hard_weight=0.1, divergence=divergence)
    check_against_oracle(kd_loss, s, t, labels, grad_teacher=True, ctx=_ctx(seed, V=V, **kw), **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize(
    "V",
    [
        3,
        8,
        15,
        16,
        17,
        31,
        32,
        33,
        63,
        64,
        65,
        127,
        128,
        129,
        255,
        256,
        257,
        511,
        513,
        1023,
        1024,
        2047,
        2048,
        2049,
        4095,
        4096,
        4097,
        8191,
        8192,
        8193,
        16385,
    ],
)
def test_vocab_boundaries(kd_loss, device, gen, seed, V, dtype):
    """Sizes around every plausible vector width / chunk length / block size."""
    N = 3 if V <= 4097 else 2
    s = make_logits((N, V), dtype, device, gen, scale=2.0)
    t = make_logits((N, V), dtype, device, gen, scale=2.0)
    labels = make_labels((N,), V, device, gen, 0.0)
    labels[0] = V - 1  # the label in the tail of the row
    kw = dict(temperature=2.0, soft_weight=0.7, hard_weight=0.3, reduction="none")
    check_against_oracle(kd_loss, s, t, labels, grad_teacher=True, ctx=_ctx(seed, V=V), **kw)


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("dtype", DT)
def test_liger_odd_shape(kd_loss, device, gen, seed, dtype, divergence):
    s = make_logits((41, 1271), dtype, device, gen, scale=4.0)
    t = make_logits((41, 1271), dtype, device, gen, scale=4.0)
    labels = make_labels((41,), 1271, device, gen, 0.1)
    kw = dict(temperature=3.0, soft_weight=0.8, hard_weight=0.2, divergence=divergence)
    check_against_oracle(kd_loss, s, t, labels, grad_teacher=True, ctx=_ctx(seed), **kw)


@pytest.mark.parametrize(
    "shape", [(7,), (1, 7), (5, 1, 7), (2, 3, 4, 11), (2, 1, 3, 1, 2, 9)], ids=str
)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_leading_shapes(kd_loss, device, gen, seed, shape, reduction):
    """Any leading shape, including none (1-D logits, 0-dim labels) and more than 4 dims."""
    s = make_logits(shape, torch.float32, device, gen)
    t = make_logits(shape, torch.float32, device, gen)
    labels = make_labels(shape[:-1], shape[-1], device, gen, 0.0)
    kw = dict(temperature=2.0, soft_weight=0.6, hard_weight=0.4, reduction=reduction)
    loss, _, _, _ = check_against_oracle(
        kd_loss, s, t, labels, grad_teacher=True, ctx=_ctx(seed, shape=shape), **kw
    )
    expected_shape = shape[:-1] if reduction == "none" else ()
    assert tuple(loss.shape) == tuple(expected_shape)


@pytest.mark.parametrize("order", ["ascending", "descending", "max_last", "max_first", "constant"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_max_position(kd_loss, device, gen, seed, order, dtype):
    """Online softmax: the running maximum moving at every element, never, or only at the end."""
    N, V = 4, 3000
    base = torch.linspace(-20.0, 20.0, V, dtype=torch.float64)
    noise = torch.rand((N, V), generator=gen, dtype=torch.float64) * 1e-3
    if order == "ascending":
        x = base + noise
    elif order == "descending":
        x = base.flip(0) + noise
    elif order == "max_last":
        x = torch.randn((N, V), generator=gen, dtype=torch.float64)
        x[:, -1] = 30.0
    elif order == "max_first":
        x = torch.randn((N, V), generator=gen, dtype=torch.float64)
        x[:, 0] = 30.0
    else:
        x = torch.full((N, V), 5.0, dtype=torch.float64)
    s = x.to(dtype).to(device)
    t = (x.flip(-1) * 0.5 + torch.randn((N, V), generator=gen, dtype=torch.float64)).to(dtype)
    t = t.to(device)
    labels = make_labels((N,), V, device, gen, 0.0)
    for divergence in DIVERGENCES:
        kw = dict(
            temperature=1.5,
            soft_weight=1.0,
            hard_weight=0.5,
            divergence=divergence,
            reduction="none",
        )
        check_against_oracle(
            kd_loss,
            s,
            t,
            labels,
            grad_teacher=True,
            ctx=_ctx(seed, order=order, divergence=divergence),
            **kw,
        )


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_identical_distributions_kl_zero(kd_loss, device, gen, seed, reduction):
    """KL(p || p) = 0 and its student gradient is 0; shifting the teacher by a constant per row
    changes nothing."""
    s = make_logits((5, 300), torch.float32, device, gen)
    t = s + torch.arange(5, device=device, dtype=torch.float32).unsqueeze(1) * 3.0
    loss, gs, gt = _run(kd_loss, s, t, temperature=2.0, reduction=reduction)
    assert loss.abs().max().item() < 1e-5, loss
    assert gs.abs().max().item() < 1e-6
    assert gt.abs().max().item() < 1e-6


def _run(kd_loss, s, t, labels=None, **kw):
    s_ = s.detach().clone().requires_grad_(True)
    t_ = t.detach().clone().requires_grad_(True)
    loss = kd_loss(s_, t_, labels, **kw)
    (loss if loss.dim() == 0 else loss.sum()).backward()
    return loss.detach(), s_.grad, t_.grad


def test_ce_equals_kl_plus_entropy(kd_loss, device, gen):
    """CE = KL + H(p) row by row (T^2-scaled), and the student gradients are identical."""
    T = 3.0
    s = make_logits((6, 200), torch.float64, device, gen)
    t = make_logits((6, 200), torch.float64, device, gen)
    l_kl, gs_kl, _ = _run(kd_loss, s, t, temperature=T, divergence="kl", reduction="none")
    l_ce, gs_ce, _ = _run(kd_loss, s, t, temperature=T, divergence="ce", reduction="none")
    logp = torch.log_softmax(t.double() / T, -1)
    H = -(logp.exp() * logp).sum(-1)
    torch.testing.assert_close(l_ce, l_kl + T * T * H, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gs_ce, gs_kl, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("reduction", ["batchmean", "mean"])
def test_mean_divides_by_valid_rows(kd_loss, device, gen, reduction):
    """mean / batchmean = sum over valid rows / number of valid rows (not N, not N * V)."""
    s = make_logits((8, 50), torch.float64, device, gen)
    t = make_logits((8, 50), torch.float64, device, gen)
    labels = make_labels((8,), 50, device, gen, 0.0)
    labels[[1, 4, 5]] = -100
    kw = dict(temperature=2.0, soft_weight=0.5, hard_weight=0.5)
    total = kd_loss(s, t, labels, reduction="sum", **kw)
    mean = kd_loss(s, t, labels, reduction=reduction, **kw)
    rows = kd_loss(s, t, labels, reduction="none", **kw)
    torch.testing.assert_close(mean, total / 5, rtol=1e-13, atol=0)
    torch.testing.assert_close(rows.sum(), total, rtol=1e-13, atol=0)
    assert (rows[[1, 4, 5]] == 0).all()


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", DT)
def test_all_ignored(kd_loss, device, gen, seed, reduction, dtype):
    """No valid row: mean/batchmean/sum are exactly 0.0 (not NaN), "none" is all zeros, grads 0."""
    s = make_logits((3, 4, 33), dtype, device, gen)
    t = make_logits((3, 4, 33), dtype, device, gen)
    labels = torch.full((3, 4), -100, dtype=torch.int64, device=device)
    kw = dict(temperature=2.0, soft_weight=0.5, hard_weight=0.5, reduction=reduction)
    loss, gs, gt = _run(kd_loss, s, t, labels, **kw)
    assert not torch.isnan(loss).any()
    assert (loss == 0).all(), loss
    assert gs is not None and (gs == 0).all()
    assert gt is None or (gt == 0).all()
    check_against_oracle(kd_loss, s, t, labels, grad_teacher=True, ctx=_ctx(seed), **kw)


@pytest.mark.parametrize("ignore_index", [-100, -1, 0, 5])
def test_custom_ignore_index(kd_loss, device, gen, seed, ignore_index):
    """Rows whose label equals ignore_index are ignored; ignore_index may lie inside [0, V)."""
    V = 9
    s = make_logits((12, V), torch.float32, device, gen)
    t = make_logits((12, V), torch.float32, device, gen)
    labels = make_labels((12,), V, device, gen, 0.0)
    labels[::3] = ignore_index
    if ignore_index != 5:  # make sure label 5 (a class, unless it is the ignore index) appears
        labels[1] = 5
    for reduction in REDUCTIONS:
        kw = dict(
            temperature=1.7,
            soft_weight=0.3,
            hard_weight=0.7,
            ignore_index=ignore_index,
            reduction=reduction,
        )
        check_against_oracle(
            kd_loss,
            s,
            t,
            labels,
            grad_teacher=True,
            ctx=_ctx(seed, ignore_index=ignore_index, reduction=reduction),
            **kw,
        )


@pytest.mark.parametrize("label_dtype", [torch.int64, torch.int32], ids=["i64", "i32"])
def test_label_dtypes(kd_loss, device, gen, seed, label_dtype):
    s = make_logits((10, 21), torch.float32, device, gen)
    t = make_logits((10, 21), torch.float32, device, gen)
    labels = make_labels((10,), 21, device, gen, 0.3, dtype=label_dtype)
    kw = dict(temperature=2.0, soft_weight=0.5, hard_weight=0.5)
    check_against_oracle(kd_loss, s, t, labels, grad_teacher=True, ctx=_ctx(seed), **kw)


def test_defaults(kd_loss, device, gen):
    """Defaults: T=1, soft_weight=1, hard_weight=0, KL, batchmean (= mean over rows of KL)."""
    s = make_logits((4, 3, 10), torch.float64, device, gen)
    t = make_logits((4, 3, 10), torch.float64, device, gen)
    got = kd_loss(s, t)
    explicit = kd_loss(
        s,
        t,
        None,
        temperature=1.0,
        soft_weight=1.0,
        hard_weight=0.0,
        divergence="kl",
        ignore_index=-100,
        reduction="batchmean",
    )
    assert torch.equal(got, explicit)
    logq = torch.log_softmax(s.cpu(), -1)
    logp = torch.log_softmax(t.cpu(), -1)
    kl = (logp.exp() * (logp - logq)).sum(-1).mean()
    torch.testing.assert_close(got.cpu(), kl, rtol=1e-12, atol=1e-14)


def test_zero_weights(kd_loss, device, gen):
    """Both weights 0: loss 0 and gradients 0 (nothing computed)."""
    s = make_logits((4, 10), torch.float32, device, gen)
    t = make_logits((4, 10), torch.float32, device, gen)
    for reduction in REDUCTIONS:
        loss, gs, gt = _run(
            kd_loss, s, t, temperature=2.0, soft_weight=0.0, hard_weight=0.0, reduction=reduction
        )
        assert (loss == 0).all()
        assert gs is None or (gs == 0).all()
        assert gt is None or (gt == 0).all()
