"""Property-based tests (hypothesis): random shapes, dtypes, logit scales, temperatures, weights,
masks and ignore patterns against the float64 oracle, and the algebra of the reductions."""

from __future__ import annotations

import math

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from oracle import DTYPES, check_against_oracle, loss_dtype_for

SETTINGS = dict(
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    print_blob=True,
)


@st.composite
def kd_cases(draw, allow_mask=True):
    lead = draw(st.lists(st.integers(1, 5), min_size=0, max_size=3))
    V = draw(st.one_of(st.integers(1, 70), st.integers(71, 2500)))
    while math.prod(lead) * V > 60000 and lead:
        lead = lead[:-1]
    sd = draw(st.sampled_from(DTYPES))
    td = draw(st.one_of(st.just(sd), st.sampled_from(DTYPES)))
    scale = 10.0 ** draw(st.floats(-2.0, 1.7))  # 0.01 .. 50
    t_scale = scale * 10.0 ** draw(st.floats(-0.5, 0.5))
    offset = draw(st.sampled_from([0.0, 0.0, 0.0, 100.0, -1000.0]))
    T = draw(st.one_of(st.sampled_from([0.05, 0.5, 1.0, 2.0, 4.0, 100.0]), st.floats(0.05, 100.0)))
    soft = draw(st.one_of(st.sampled_from([0.0, 1.0, 0.5]), st.floats(0.0, 3.0)))
    hard = draw(st.one_of(st.sampled_from([0.0, 0.0, 1.0, 0.1]), st.floats(0.0, 3.0)))
    if soft == 0 and hard == 0:  # both off is covered by test_kd_loss.py::test_zero_weights
        soft = 1.0
    with_labels = hard > 0 or draw(st.booleans())
    ignore_frac = draw(st.sampled_from([0.0, 0.2, 0.6, 1.0])) if with_labels else 0.0
    ignore_index = draw(st.sampled_from([-100, -1, 0])) if with_labels else -100
    divergence = draw(st.sampled_from(["kl", "ce"]))
    reduction = draw(st.sampled_from(["batchmean", "mean", "sum", "none"]))
    mask_frac = draw(st.sampled_from([0.0, 0.0, 0.3])) if allow_mask and V > 1 else 0.0
    grad_teacher = draw(st.booleans())
    go_kind = draw(st.sampled_from(["one", "random"]))
    seed = draw(st.integers(0, 2**48))
    return dict(
        lead=tuple(lead),
        V=V,
        sd=sd,
        td=td,
        scale=scale,
        t_scale=t_scale,
        offset=offset,
        T=T,
        soft=soft,
        hard=hard,
        with_labels=with_labels,
        ignore_frac=ignore_frac,
        ignore_index=ignore_index,
        divergence=divergence,
        reduction=reduction,
        mask_frac=mask_frac,
        grad_teacher=grad_teacher,
        go_kind=go_kind,
        seed=seed,
    )


def _build(c, device):
    g = torch.Generator().manual_seed(c["seed"])
    shape = c["lead"] + (c["V"],)
    f64 = torch.float64
    s = torch.randn(shape, generator=g, dtype=f64) * c["scale"] + c["offset"]
    t = torch.randn(shape, generator=g, dtype=f64) * c["t_scale"] + c["offset"]
    if c["mask_frac"] > 0:
        m = torch.rand(shape, generator=g) < c["mask_frac"]
        keep = torch.randint(0, c["V"], c["lead"], generator=g)
        m.scatter_(-1, keep.unsqueeze(-1), False)
        s = s.masked_fill(m, -math.inf)
        t = t.masked_fill(m, -math.inf)
    else:
        keep = torch.randint(0, c["V"], c["lead"], generator=g)
    labels = None
    if c["with_labels"]:
        # labels on unmasked positions; an ignore_index inside [0, V) (0 here) makes the rows
        # with that label ignored, which is the semantics
        labels = (
            keep.clone() if c["mask_frac"] > 0 else torch.randint(0, c["V"], c["lead"], generator=g)
        )
        drop = torch.rand(c["lead"], generator=g) < c["ignore_frac"]
        labels = torch.where(drop, torch.full_like(labels, c["ignore_index"]), labels)
        labels = labels.to(device)
    kw = dict(
        temperature=c["T"],
        soft_weight=c["soft"],
        hard_weight=c["hard"],
        divergence=c["divergence"],
        ignore_index=c["ignore_index"],
        reduction=c["reduction"],
    )
    go = None
    if c["go_kind"] == "random":
        ldt = loss_dtype_for(c["sd"], c["td"])
        gshape = c["lead"] if c["reduction"] == "none" else ()
        go = (torch.rand(gshape, generator=g, dtype=f64) * 4 - 2).to(ldt).to(device)
    return s.to(c["sd"]).to(device), t.to(c["td"]).to(device), labels, kw, go


@settings(max_examples=60, **SETTINGS)
@given(c=kd_cases())
def test_random_cases_vs_oracle(kd_loss, device, c):
    s, t, labels, kw, go = _build(c, device)
    check_against_oracle(
        kd_loss,
        s,
        t,
        labels,
        grad_teacher=c["grad_teacher"],
        grad_output=go,
        ctx=f"\n  [case={c}]",
        **kw,
    )


@settings(max_examples=40, **SETTINGS)
@given(c=kd_cases(allow_mask=False))
def test_reduction_algebra(kd_loss, device, c):
    """sum == none.sum(); mean == batchmean == sum / n_valid (0 when no valid row); "none" is 0 at
    ignored rows and has the leading shape."""
    s, t, labels, kw, _ = _build(c, device)
    kw = {k: v for k, v in kw.items() if k != "reduction"}
    rows = kd_loss(s, t, labels, reduction="none", **kw)
    total = kd_loss(s, t, labels, reduction="sum", **kw)
    mean = kd_loss(s, t, labels, reduction="mean", **kw)
    bmean = kd_loss(s, t, labels, reduction="batchmean", **kw)
    assert tuple(rows.shape) == c["lead"]
    assert total.shape == () and mean.shape == () and bmean.shape == ()
    assert torch.equal(mean, bmean)
    if labels is not None:
        valid = labels != c["ignore_index"]
        assert (rows[~valid] == 0).all()
        n_valid = int(valid.sum())
    else:
        n_valid = rows.numel()
    r64 = rows.double()
    rtol = 1e-12 if rows.dtype == torch.float64 else 1e-5
    scale = r64.abs().sum().item()
    assert abs(total.double().item() - r64.sum().item()) <= rtol * scale + 1e-30, (total, rows)
    expect_mean = total.double().item() / max(n_valid, 1)
    assert abs(mean.double().item() - expect_mean) <= rtol * (scale / max(n_valid, 1)) + 1e-30
    if n_valid == 0:
        assert mean.item() == 0.0 and total.item() == 0.0
