"""kdfused.topk_kd_loss's conventions (support "full" / "renormalized" / "tail", values "logits" /
"logprobs", every divergence with beta, -inf padding) against the float64 reference
(kdfused.reference.topk_kd_loss, autograd), in float64, float32 and bfloat16.

Random inputs on every run (the run's seed is printed; KDFUSED_TEST_SEED=<seed> replays it).
Each case holds rows padded as TRL pads (trailing -inf entries at index 0, duplicating a valid 0),
a row of padding only and an ignored row.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import kdfused
from kdfused._checks import DIVERGENCES, SUPPORTS, TOPK_DIVERGENCES
from kdfused.reference import topk_kd_loss as ref_topk_kd_loss

from topk_checks import check_against_ref, run_fused, tolerances

pytestmark = pytest.mark.fused_only

F64 = torch.float64
NEG_INF = -math.inf
IGNORE = -100


def _combos():
    """Every (support, values, divergence) the op accepts."""
    out = []
    for support in SUPPORTS:
        kinds = ("logprobs",) if support == "tail" else ("logits", "logprobs")
        divergences = TOPK_DIVERGENCES if support == "full" else DIVERGENCES
        out += [(support, v, d) for v in kinds for d in divergences]
    return out


COMBOS = _combos()


def make_case(gen, N, V, k, *, values, T=1.0, dtype=torch.float32, vdtype=None, device="cpu"):
    """Student logits, a teacher's top-k (its logits, or its log-probabilities at T), labels.
    Row 0: its last two entries padding at index 0 (its first entry is index 0, so the padding
    duplicates it); row 2: one valid entry; row 3: padding only; row 1: ignored."""
    assert N >= 5 and k >= 3
    s = torch.randn(N, V, generator=gen, dtype=F64) * 2.5
    t = s + torch.randn(N, V, generator=gen, dtype=F64) * 2.5
    t[0, 0] = t[0].max() + 1.0
    stored = t if values == "logits" else F.log_softmax(t / T, dim=-1)
    vals, idx = torch.topk(stored, k, dim=-1)
    for r, keep in ((0, k - 2), (2, 1), (3, 0)):
        vals[r, keep:] = NEG_INF
        idx[r, keep:] = 0
    y = torch.randint(0, V, (N,), generator=gen)
    y[1] = IGNORE
    vdtype = vdtype or dtype
    return s.to(dtype).to(device), idx.to(device), vals.to(vdtype).to(device), y.to(device)


def _beta(gen, divergence):
    return float(torch.rand((), generator=gen)) * 0.8 + 0.1 if divergence == "jsd" else 0.5


# ---- every convention against the reference ----------------------------------------------------


@pytest.mark.parametrize("support,values,divergence", COMBOS)
@pytest.mark.parametrize("dtype", [F64, torch.float32, torch.bfloat16], ids=["f64", "f32", "bf16"])
@pytest.mark.parametrize("T", [1.0, 2.0])
@pytest.mark.parametrize("hw", [0.0, 0.4], ids=["soft", "soft+hard"])
def test_convention_against_reference(device, gen, support, values, divergence, dtype, T, hw):
    s, idx, vals, y = make_case(gen, 7, 300, 12, values=values, T=T, dtype=dtype, device=device)
    kw = dict(temperature=T, soft_weight=1.0 - hw / 2, hard_weight=hw, divergence=divergence)
    kw.update(beta=_beta(gen, divergence), support=support, values=values, reduction="none")
    loss, grad = check_against_ref(s, idx, vals, y, **kw)
    assert loss[1] == 0 and (grad[1] == 0).all()  # ignored row
    # padding only (row 3): the hard term alone, no soft gradient
    hard = hw * F.cross_entropy(s[3:4].double().cpu(), y[3:4].cpu())
    la, lr, ga, gr = tolerances(dtype, dtype, kw, 300)
    torch.testing.assert_close(loss[3].double().cpu(), hard, atol=la, rtol=lr)
    if hw == 0:
        assert loss[3] == 0 and (grad[3] == 0).all()


@pytest.mark.parametrize("beta", [0.0, 1.0])
@pytest.mark.parametrize("support", ["renormalized", "tail"])
def test_jsd_end_points_are_the_kls(gen, beta, support):
    """jsd at beta 0 / 1 is kl / reverse_kl, bitwise (the same code path)."""
    s, idx, vals, y = make_case(gen, 6, 200, 8, values="logprobs", T=2.0)
    kw = dict(temperature=2.0, support=support, values="logprobs", reduction="none")
    a = run_fused(s, idx, vals, y, divergence="jsd", beta=beta, **kw)
    b = run_fused(s, idx, vals, y, divergence="kl" if beta == 0 else "reverse_kl", **kw)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    check_against_ref(s, idx, vals, y, divergence="jsd", beta=beta, **kw)


@pytest.mark.parametrize("support,values,divergence", COMBOS)
@pytest.mark.parametrize("reduction", ["batchmean", "mean", "sum"])
def test_reductions(device, gen, support, values, divergence, reduction):
    s, idx, vals, y = make_case(gen, 9, 150, 6, values=values, T=1.5, device=device)
    kw = dict(temperature=1.5, soft_weight=0.7, hard_weight=0.3, divergence=divergence)
    kw.update(beta=_beta(gen, divergence), support=support, values=values, reduction=reduction)
    check_against_ref(s, idx, vals, y, **kw)


@pytest.mark.parametrize("support,values,divergence", COMBOS)
def test_student_logit_transform(gen, support, values, divergence):
    s, idx, vals, y = make_case(gen, 6, 120, 7, values=values, T=2.0, dtype=F64)
    kw = dict(temperature=2.0, soft_weight=0.8, hard_weight=0.2, divergence=divergence)
    kw.update(beta=_beta(gen, divergence), support=support, values=values, reduction="none")
    check_against_ref(s, idx, vals, y, student_logit_scale=0.7, student_softcap=6.0, **kw)
    if values == "logits":  # the teacher's transform applies to stored logits only
        check_against_ref(s, idx, vals, y, teacher_logit_scale=1.3, teacher_softcap=5.0, **kw)


@pytest.mark.parametrize("vdtype", [torch.bfloat16, torch.float16, torch.float32, F64])
@pytest.mark.parametrize("support", SUPPORTS)
def test_stored_value_dtypes(gen, vdtype, support):
    """Stored log-probabilities in any float dtype (the reference reads the same rounded ones)."""
    s, idx, vals, y = make_case(gen, 6, 500, 16, values="logprobs", T=1.0, vdtype=vdtype)
    kw = dict(support=support, values="logprobs", divergence="kl", reduction="none")
    check_against_ref(s, idx.to(torch.int32), vals, y, **kw)


def test_topk_teacher_logprobs_round_trip(gen):
    """topk_teacher(values="logprobs") feeds support "tail": with every entry stored the tail
    holds no mass, and the loss is kd_loss's."""
    s = torch.randn(5, 40, generator=gen, dtype=F64) * 2
    t = torch.randn(5, 40, generator=gen, dtype=F64) * 2
    idx, lp = kdfused.topk_teacher(t, 40, temperature=2.0, values="logprobs", value_dtype=F64)
    for support in ("full", "renormalized", "tail"):
        a = kdfused.topk_kd_loss(s, idx, lp, temperature=2.0, support=support, values="logprobs")
        b = kdfused.kd_loss(s, t, temperature=2.0)
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


# ---- bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw,match",
    [
        (
            dict(support="full", divergence="jsd"),
            r"support='full' supports divergence 'kl' or 'ce'",
        ),
        (
            dict(support="full", divergence="tvd"),
            r"support='full' supports divergence 'kl' or 'ce'",
        ),
        (dict(support="tail", values="logits"), r"support='tail' needs values='logprobs'"),
        (dict(values="logprobs", teacher_softcap=3.0), r"teacher_softcap do not apply"),
        (dict(values="logprobs", teacher_logit_scale=2.0), r"teacher_softcap do not apply"),
        (dict(support="sparse"), r"support must be one of"),
        (dict(values="probs"), r"values must be 'logits' or 'logprobs'"),
        (dict(support="renormalized", divergence="js"), r"divergence must be one of"),
        (dict(support="renormalized", divergence="jsd", beta=1.5), r"beta must be in \[0, 1\]"),
    ],
)
def test_bad_combinations(gen, kw, match):
    s, idx, vals, y = make_case(gen, 5, 40, 4, values="logprobs")
    with pytest.raises(ValueError, match=match):
        kdfused.topk_kd_loss(s, idx, vals, y, **kw)
    with pytest.raises(ValueError, match=match):
        kdfused.TopKKDLoss(**kw)
    with pytest.raises(ValueError, match=match):
        ref_topk_kd_loss(s, idx, vals, y, **kw)


@pytest.mark.parametrize("kw", [dict(support=1), dict(values=None)])
def test_bad_option_types(gen, kw):
    s, idx, vals, y = make_case(gen, 5, 40, 4, values="logprobs")
    with pytest.raises(TypeError, match="support and values must be strings"):
        kdfused.topk_kd_loss(s, idx, vals, y, **kw)


@pytest.mark.parametrize("support", SUPPORTS)
def test_bad_indices(gen, support):
    values = "logprobs"
    s, idx, vals, y = make_case(gen, 6, 40, 5, values=values)
    kw = dict(support=support, values=values)
    # a duplicate among the valid entries (row 4)
    dup = idx.clone()
    dup[4, 3] = dup[4, 1]
    for fn in (kdfused.topk_kd_loss, ref_topk_kd_loss):
        with pytest.raises(ValueError, match=r"distinct within a row, got \d+ twice in row 4"):
            fn(s, dup, vals, y, **kw)
    # out of range, in a valid entry and in a padding entry alike
    for r, j in ((5, 2), (3, 1)):
        bad = idx.clone()
        bad[r, j] = 40
        for fn in (kdfused.topk_kd_loss, ref_topk_kd_loss):
            with pytest.raises(ValueError, match=rf"must be in \[0, 40\), got 40 at row {r}"):
                fn(s, bad, vals, y, **kw)
    # duplicates in padding are allowed (rows 0 and 3 already repeat index 0), also an index
    # that a valid entry holds
    ok = idx.clone()
    ok[2, 1:] = ok[2, 0]
    check_against_ref(s, ok, vals, y, **kw)


def test_padding_at_any_position(gen):
    """Padding need not trail: -inf entries anywhere in the row, their indices anything."""
    s, idx, vals, y = make_case(gen, 6, 80, 8, values="logprobs", dtype=F64)
    perm = torch.rand(6, 8, generator=gen).argsort(-1)
    idx, vals = idx.gather(1, perm), vals.gather(1, perm)
    for support in SUPPORTS:
        kw = dict(support=support, values="logprobs", divergence="kl", reduction="none")
        check_against_ref(s, idx, vals, y, **kw)


# ---- the custom op ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "support,values,divergence,dtype",
    [
        ("full", "logprobs", "ce", torch.float32),
        ("renormalized", "logits", "jsd", torch.bfloat16),
        ("renormalized", "logprobs", "tvd", F64),
        ("tail", "logprobs", "reverse_kl", torch.float32),
    ],
)
def test_opcheck(gen, support, values, divergence, dtype):
    s, idx, vals, y = make_case(gen, 6, 40, 6, values=values, dtype=dtype)
    logit_map = (0.7, 1.3, 5.0, 2.0) if values == "logits" else (0.7, 1.0, 5.0, 0.0)
    args = (s.requires_grad_(), idx, vals, y, 2.0, 0.7, 0.3, divergence, 0.3, IGNORE, "none")
    args += (logit_map, support, values, True)
    torch.library.opcheck(torch.ops.kdfused.topk_kd_loss, args)


def test_torch_compile_fullgraph(gen):
    torch._dynamo.reset()
    s, idx, vals, y = make_case(gen, 6, 100, 8, values="logprobs")
    kw = dict(temperature=2.0, support="tail", values="logprobs", divergence="jsd", beta=0.3)

    def step(s, idx, vals, y):
        return kdfused.topk_kd_loss(s, idx, vals, y, **kw) * 2.0

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    s1, s2 = s.clone().requires_grad_(), s.clone().requires_grad_()
    out = compiled(s1, idx, vals, y)
    out.backward()
    ref = step(s2, idx, vals, y)
    ref.backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(s1.grad, s2.grad)


def test_fake_kernel_checks_combinations(gen):
    from torch._subclasses.fake_tensor import FakeTensorMode

    s, idx, vals, y = make_case(gen, 5, 40, 4, values="logprobs")
    with FakeTensorMode() as mode:
        fs, fi, fv = mode.from_tensor(s), mode.from_tensor(idx), mode.from_tensor(vals)
        opts = (1.0, 1.0, 0.0, "jsd", 0.5, IGNORE, "none", ())
        loss, gs, scale = torch.ops.kdfused.topk_kd_loss(
            fs, fi, fv, None, *opts, "tail", "logprobs", True
        )
        assert loss.shape == (5,) and gs.shape == s.shape
        with pytest.raises(ValueError, match="with support='full'"):
            torch.ops.kdfused.topk_kd_loss(fs, fi, fv, None, *opts, "full", "logprobs", False)
        with pytest.raises(ValueError, match="needs values='logprobs'"):
            torch.ops.kdfused.topk_kd_loss(fs, fi, fv, None, *opts, "tail", "logits", False)
