"""Inputs: every bad input raises a clear error; strided, transposed, expanded and offset views;
mixed student/teacher dtypes; inputs are never modified; results are bitwise deterministic;
empty batches.

Size: the table of every bad input and its error, kept together so that it reads as the contract.
"""

from __future__ import annotations

import math

import pytest
import torch

from oracle import (
    DTYPE_IDS,
    check_against_oracle,
    loss_dtype_for,
    make_labels,
    make_logits,
)
from params import DT, ERRORS
from params import ctx as _ctx

N, V = 6, 11


# ------------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------------
# Each case: (student, teacher, labels, kwargs) built on the device, and the regex the message
# must match (case-insensitive). The words are deliberately lenient.


def _f(shape, device, dtype=torch.float32):
    return torch.randn(shape, dtype=dtype, device=device)


def _y(device, shape=(N,), dtype=torch.int64):
    return torch.randint(0, V, shape, device=device).to(dtype)


def _option_case(**option):
    """A case whose inputs are fine and whose one option is bad (labels for hard_weight)."""
    with_labels = "hard_weight" in option
    return lambda d: (_f((N, V), d), _f((N, V), d), _y(d) if with_labels else None, option)


def _label_values_case(values, dtype=torch.int64, **options):
    """A case whose logits are fine and whose labels hold `values` (hard_weight 0.5 unless the
    options say otherwise)."""
    options = {"hard_weight": 0.5, **options}

    def build(d):
        s, t = _f((N, V), d), _f((N, V), d)
        return s, t, torch.tensor(values, device=d, dtype=dtype), dict(options)

    return build


BAD = {
    # shapes
    "shape-vocab": (lambda d: (_f((N, V), d), _f((N, V + 1), d), None, {}), "shape"),
    "shape-rows": (lambda d: (_f((N, V), d), _f((N + 1, V), d), None, {}), "shape"),
    "shape-ndim": (lambda d: (_f((2, 3, V), d), _f((6, V), d), None, {}), "shape"),
    "0-dim": (
        lambda d: (torch.tensor(1.0, device=d), torch.tensor(2.0, device=d), None, {}),
        "dim|scalar|shape",
    ),
    # dtypes
    "int-student": (
        lambda d: (torch.randint(0, 5, (N, V), device=d), _f((N, V), d), None, {}),
        "float",
    ),
    "int-teacher": (
        lambda d: (
            _f((N, V), d),
            torch.randint(0, 5, (N, V), device=d, dtype=torch.int32),
            None,
            {},
        ),
        "float",
    ),
    "bool-logits": (
        lambda d: (
            torch.ones((N, V), dtype=torch.bool, device=d),
            torch.ones((N, V), dtype=torch.bool, device=d),
            None,
            {},
        ),
        "float",
    ),
    # labels
    "labels-shape-long": (
        lambda d: (_f((N, V), d), _f((N, V), d), _y(d, (N + 1,)), dict(hard_weight=0.5)),
        "label",
    ),
    "labels-shape-2d": (
        lambda d: (_f((N, V), d), _f((N, V), d), _y(d, (N, 1)), dict(hard_weight=0.5)),
        "label",
    ),
    "labels-shape-3d-logits": (
        lambda d: (_f((2, 3, V), d), _f((2, 3, V), d), _y(d, (3, 2)), dict(hard_weight=0.5)),
        "label",
    ),
    "labels-float": (
        lambda d: (_f((N, V), d), _f((N, V), d), _y(d, dtype=torch.float32), dict(hard_weight=0.5)),
        "label",
    ),
    "labels-bool": (
        lambda d: (_f((N, V), d), _f((N, V), d), _y(d, dtype=torch.bool), dict(hard_weight=0.5)),
        "label",
    ),
    "labels-too-big": (_label_values_case([0, 1, V, 2, 3, 4]), "label"),
    "labels-huge": (_label_values_case([0, 1, 2, 3, 10**12, 4]), "label"),
    "labels-negative": (_label_values_case([0, -1, 2, 3, 4, 5]), "label"),
    "labels-neg-other-ignore": (
        _label_values_case([0, -100, 2, 3, 4, 5], ignore_index=-1),
        "label",
    ),
    "labels-int32-too-big": (_label_values_case([0, 1, 2, 3, 4, V], dtype=torch.int32), "label"),
    # out-of-range labels are bad input even when the hard term is off (they select rows)
    "labels-too-big-soft-only": (
        _label_values_case([0, 1, V + 3, 2, 3, 4], hard_weight=0.0),
        "label",
    ),
    "hard-without-labels": (
        lambda d: (_f((N, V), d), _f((N, V), d), None, dict(hard_weight=0.5)),
        "label",
    ),
    # scalars
    **{
        f"temperature={T}": (_option_case(temperature=T), "temperature")
        for T in [0.0, -1.0, math.nan, math.inf, -math.inf]
    },
    **{
        f"soft_weight={w}": (_option_case(soft_weight=w), "weight")
        for w in [-0.1, math.nan, math.inf]
    },
    **{
        f"hard_weight={w}": (_option_case(hard_weight=w), "weight")
        for w in [-1.0, math.nan, math.inf]
    },
    "divergence-js": (_option_case(divergence="js"), "divergence"),
    "divergence-empty": (_option_case(divergence=""), "divergence"),
    "reduction-avg": (_option_case(reduction="avg"), "reduction"),
    "reduction-elementwise_mean": (_option_case(reduction="elementwise_mean"), "reduction"),
}


# Out-of-range label *values* on a GPU are found by the kernel itself (no host sync): a
# device-side assert, after which the process's CUDA context is unusable. Those cases run in a
# process of their own and expect the assert.
DEVICE_ASSERT_CASES = [
    "labels-too-big",
    "labels-huge",
    "labels-negative",
    "labels-neg-other-ignore",
    "labels-int32-too-big",
    "labels-too-big-soft-only",
]

_DEVICE_ASSERT_SCRIPT = r"""
import sys
sys.path.insert(0, sys.argv[1])
import torch, kdfused
import test_inputs
s, t, labels, kw = test_inputs.BAD[sys.argv[2]][0](sys.argv[3])
loss = kdfused.kd_loss(s.requires_grad_(), t, labels, **kw)
if s.is_cuda:
    torch.cuda.synchronize()
print("no error, loss", loss.item())
"""


def _run_bad_label_process(case, device):
    import os
    import subprocess
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    out = subprocess.run(
        [sys.executable, "-c", _DEVICE_ASSERT_SCRIPT, here, case, device],
        capture_output=True,
        text=True,
        timeout=300,
    )
    return out.returncode, out.stdout + out.stderr


def _expect_device_assert(case):
    rc, text = _run_bad_label_process(case, "cuda")
    if rc == 0 and "no error" in text:
        pytest.skip(f"this torch build has no CUDA kernel asserts ({text.strip()[-200:]})")
    assert rc != 0 and "device-side assert" in text, text[-2000:]


@pytest.mark.fused_only
def test_bad_label_process_on_cpu():
    """The one-process-per-case runner itself, on the CPU (a clear error there, not an assert)."""
    rc, text = _run_bad_label_process("labels-too-big", "cpu")
    assert rc != 0 and "label" in text.lower() and "no error" not in text, text[-2000:]


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input(kd_loss, device, case, impl_name):
    if device == "cuda" and case in DEVICE_ASSERT_CASES and impl_name != "reference":
        _expect_device_assert(case)
        return
    build, pattern = BAD[case]
    s, t, labels, kw = build(device)
    if s.is_floating_point():
        s.requires_grad_(True)
    s0 = s.detach().clone()
    with pytest.raises(ERRORS, match=f"(?i){pattern}"):
        loss = kd_loss(s, t, labels, **kw)
        # (an error raised only in backward is too late, but report it as a failure clearly)
        pytest.fail(f"no error for {case}; returned {loss}")
    assert torch.equal(s.detach(), s0)


def test_device_mismatch_meta(kd_loss):
    """Logits on different devices (here CPU and meta, so it runs without a GPU)."""
    s = torch.randn(N, V)
    t = torch.randn(N, V, device="meta")
    with pytest.raises(ERRORS, match="(?i)device"):
        kd_loss(s, t)
    with pytest.raises(ERRORS, match="(?i)device"):
        kd_loss(t, s)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
@pytest.mark.parametrize("which", ["teacher", "student", "labels"])
def test_device_mismatch_cuda(kd_loss, which):
    s = torch.randn(N, V, device="cuda")
    t = torch.randn(N, V, device="cuda")
    y = torch.randint(0, V, (N,), device="cuda")
    if which == "teacher":
        t = t.cpu()
    elif which == "student":
        s = s.cpu()
    else:
        y = y.cpu()
    with pytest.raises(ERRORS, match="(?i)device"):
        kd_loss(s, t, y, hard_weight=0.5)


def test_options_keyword_only(kd_loss):
    """temperature etc. are keyword-only (a positional fourth argument is a TypeError)."""
    s, t = torch.randn(N, V), torch.randn(N, V)
    with pytest.raises(TypeError):
        kd_loss(s, t, None, 2.0)


# ------------------------------------------------------------------------------------------------
# strides and views
# ------------------------------------------------------------------------------------------------

KW = dict(temperature=2.0, soft_weight=0.7, hard_weight=0.3)


def _views(kind, dtype, device, gen):
    """Returns (student, teacher) non-contiguous views of the requested kind."""
    B, L, Vv = 3, 5, 37
    if kind == "row-strided":  # logits[:, :-1] and logits[:, 1:] of (B, L+1, V)
        s = make_logits((B, L + 1, Vv), dtype, device, gen)[:, :-1]
        t = make_logits((B, L + 1, Vv), dtype, device, gen)[:, 1:]
    elif kind == "padded-rows":  # rows of a wider buffer (stride V+3)
        s = make_logits((B * L, Vv + 3), dtype, device, gen)[:, :Vv]
        t = make_logits((B * L, Vv + 5), dtype, device, gen)[:, 2 : Vv + 2]
    elif kind == "transposed":  # last-dim stride != 1
        s = make_logits((Vv, B * L), dtype, device, gen).t()
        t = make_logits((Vv, B * L), dtype, device, gen).t()
    elif kind == "step2":  # last-dim stride 2
        s = make_logits((B, L, 2 * Vv), dtype, device, gen)[..., ::2]
        t = make_logits((B, L, 2 * Vv), dtype, device, gen)[..., 1::2]
    elif kind == "permuted-rows":  # (L, B, V) transposed to (B, L, V)
        s = make_logits((L, B, Vv), dtype, device, gen).transpose(0, 1)
        t = make_logits((L, B, Vv), dtype, device, gen).transpose(0, 1)
    elif kind == "expanded-teacher":  # stride 0 over rows
        s = make_logits((B, L, Vv), dtype, device, gen)
        t = make_logits((1, 1, Vv), dtype, device, gen).expand(B, L, Vv)
    elif kind == "offset":  # nonzero storage offset
        s = make_logits((B * L + 2, Vv), dtype, device, gen)[2:]
        t = make_logits((B * L + 1, Vv), dtype, device, gen)[1:]
    elif kind == "many-row-dims":  # 5 non-coalescable row dims
        s = make_logits((2, 3, 2, 3, 2, Vv), dtype, device, gen).permute(4, 3, 2, 1, 0, 5)
        t = make_logits((2, 3, 2, 3, 2, Vv), dtype, device, gen).permute(4, 3, 2, 1, 0, 5)
    elif kind == "mixed":  # student row-strided, teacher transposed
        s = make_logits((B * L, Vv + 1), dtype, device, gen)[:, 1:]
        t = make_logits((Vv, B * L), dtype, device, gen).t()
    else:
        raise AssertionError(kind)
    return s, t


VIEW_KINDS = [
    "row-strided",
    "padded-rows",
    "transposed",
    "step2",
    "permuted-rows",
    "expanded-teacher",
    "offset",
    "many-row-dims",
    "mixed",
]


@pytest.mark.parametrize("dtype", DT)
@pytest.mark.parametrize("reduction", ["batchmean", "none"])
@pytest.mark.parametrize("kind", VIEW_KINDS)
def test_views(kd_loss, device, gen, seed, kind, reduction, dtype):
    s, t = _views(kind, dtype, device, gen)
    labels = make_labels(s.shape[:-1], s.shape[-1], device, gen, 0.2)
    kw = dict(KW, reduction=reduction)
    check_against_oracle(
        kd_loss,
        s,
        t,
        labels,
        grad_teacher=kind != "expanded-teacher",
        ctx=_ctx(seed, kind=kind),
        **kw,
    )
    # and the same numbers as the contiguous copies
    a = kd_loss(s, t, labels, **kw)
    b = kd_loss(s.contiguous(), t.contiguous(), labels, **kw)
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("kind", ["strided", "int32-strided", "expanded"])
def test_noncontiguous_labels(kd_loss, device, gen, seed, kind):
    s = make_logits((N, V), torch.float32, device, gen)
    t = make_logits((N, V), torch.float32, device, gen)
    if kind == "strided":
        labels = make_labels((N, 3), V, device, gen, 0.3)[:, 1]
    elif kind == "int32-strided":
        labels = make_labels((N, 2), V, device, gen, 0.3, dtype=torch.int32)[:, 0]
    else:
        labels = torch.tensor([4], device=device).expand(N)
    assert not labels.is_contiguous() or kind == "expanded"
    check_against_oracle(kd_loss, s, t, labels, grad_teacher=True, ctx=_ctx(seed, kind=kind), **KW)


def test_row_strided_view_is_not_copied(kd_loss, device, gen):
    """logits[:, :-1] must work without a copy: the op may not write into the view's storage and
    the result equals the contiguous one bitwise (same per-row arithmetic)."""
    B, L, Vv = 2, 9, 4099
    base_s = make_logits((B, L + 1, Vv), torch.float32, device, gen)
    base_t = make_logits((B, L + 1, Vv), torch.float32, device, gen)
    s, t = base_s[:, :-1], base_t[:, 1:]
    labels = make_labels((B, L), Vv, device, gen, 0.2)
    a = kd_loss(s, t, labels, **dict(KW, reduction="none"))
    b = kd_loss(s.contiguous(), t.contiguous(), labels, **dict(KW, reduction="none"))
    assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------------
# mixed dtypes
# ------------------------------------------------------------------------------------------------

MIXED = [
    (torch.bfloat16, torch.float32),
    (torch.float32, torch.bfloat16),
    (torch.float16, torch.float32),
    (torch.float16, torch.bfloat16),
    (torch.bfloat16, torch.float16),
    (torch.float32, torch.float64),
    (torch.float64, torch.bfloat16),
    (torch.float16, torch.float64),
]


@pytest.mark.parametrize("divergence", ["kl", "ce"])
@pytest.mark.parametrize("sd,td", MIXED, ids=lambda d: DTYPE_IDS[d])
def test_mixed_dtypes(kd_loss, device, gen, seed, sd, td, divergence):
    """Student and teacher of different dtypes: accumulate in float64 if either is float64 (loss
    float64), else float32 (loss float32); each gradient in its own input's dtype."""
    s = make_logits((4, 3, 257), sd, device, gen)
    t = make_logits((4, 3, 257), td, device, gen)
    labels = make_labels((4, 3), 257, device, gen, 0.2)
    for reduction in ["batchmean", "none"]:
        kw = dict(KW, divergence=divergence, reduction=reduction)
        loss, gs, gt, _ = check_against_oracle(
            kd_loss, s, t, labels, grad_teacher=True, ctx=_ctx(seed, **kw), **kw
        )
        assert loss.dtype == loss_dtype_for(sd, td)
        assert gs.dtype == sd and gt.dtype == td


# ------------------------------------------------------------------------------------------------
# no mutation, determinism
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DT)
@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_inputs_not_modified(kd_loss, device, gen, dtype, reduction):
    s = make_logits((5, 3, 130), dtype, device, gen)
    t = make_logits((5, 3, 130), dtype, device, gen)
    s[0, 0, :7] = float("-inf")
    t[0, 0, :7] = float("-inf")
    labels = make_labels((5, 3), 130, device, gen, 0.3, dtype=torch.int32)
    labels[0, 0] = 100
    s0, t0, y0 = s.clone(), t.clone(), labels.clone()
    s.requires_grad_(True)
    t.requires_grad_(True)
    kw = dict(KW, reduction=reduction)
    loss = kd_loss(s, t, labels, **kw)
    loss.backward(torch.rand_like(loss) + 0.5)
    loss2 = kd_loss(s, t, labels, **kw)
    (loss2 * 3.0).sum().backward()
    assert torch.equal(s.detach(), s0) and torch.equal(t.detach(), t0)
    assert torch.equal(labels, y0) and labels.dtype == torch.int32


def _bits(x: torch.Tensor) -> torch.Tensor:
    x = x.detach().contiguous()
    view = {2: torch.int16, 4: torch.int32, 8: torch.int64}[x.element_size()]
    return x.view(view)


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.bfloat16, torch.float64], ids=["f32", "bf16", "f64"]
)
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
def test_deterministic(kd_loss, device, gen, dtype, reduction):
    """Same inputs -> bitwise the same loss and gradients, run after run."""
    s = make_logits((64, 4099), dtype, device, gen, scale=4.0)
    t = make_logits((64, 4099), dtype, device, gen, scale=4.0)
    labels = make_labels((64,), 4099, device, gen, 0.2)
    kw = dict(KW, reduction=reduction)
    results = []
    for _ in range(3):
        s_ = s.clone().requires_grad_(True)
        t_ = t.clone().requires_grad_(True)
        loss = kd_loss(s_, t_, labels, **kw)
        (
            loss
            if loss.dim() == 0
            else (loss * torch.linspace(0.5, 2, loss.numel(), device=device)).sum()
        ).backward()
        results.append((_bits(loss), _bits(s_.grad), _bits(t_.grad)))
    for r in results[1:]:
        for a, b, what in zip(results[0], r, ["loss", "grad_student", "grad_teacher"]):
            assert torch.equal(a, b), f"{what} differs between runs"


# ------------------------------------------------------------------------------------------------
# empty batches
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["batchmean", "mean", "sum", "none"])
def test_empty_batch(kd_loss, device, reduction):
    """Zero rows (any leading shape includes a 0-sized one): reduced losses are 0.0 (not NaN),
    "none" is an empty tensor, gradients are empty."""
    s = torch.randn((0, 3, V), device=device).requires_grad_(True)
    t = torch.randn((0, 3, V), device=device).requires_grad_(True)
    labels = torch.zeros((0, 3), dtype=torch.int64, device=device)
    loss = kd_loss(s, t, labels, reduction=reduction, soft_weight=0.5, hard_weight=0.5)
    if reduction == "none":
        assert loss.shape == (0, 3)
    else:
        assert loss.shape == () and loss.item() == 0.0
    (loss if loss.dim() == 0 else loss.sum()).backward()
    assert s.grad is not None and s.grad.shape == s.shape
