"""The CPU kernel is compiled once per instruction set (portable, AVX2, AVX-512) and the widest one
the CPU supports is used; the "scalar" path runs the CUDA kernels' per-element code on the host.
These tests run every compiled variant on the same inputs, so that the paths a user's CPU may take
(and every line of maths the GPU runs) are all checked, not only the one this machine picks."""

from __future__ import annotations

import pytest
import torch

import kdfused
from kdfused._checks import DIVERGENCES, SUPPORTS, TOPK_DIVERGENCES, VALUE_KINDS

pytestmark = pytest.mark.fused_only


def _compiled_isas() -> list:
    try:
        return kdfused.build_info()["cpu_isa_compiled"]
    except ImportError:  # no extension (e.g. --kd-impl=reference where it was never built)
        return ["default"]


ISAS = _compiled_isas()


def _case(dtype, V, seed, divergence):
    g = torch.Generator().manual_seed(seed)
    N = 9
    s = (torch.randn(N, V, generator=g) * 4).to(dtype)
    t = (torch.randn(N, V, generator=g) * 4).to(dtype)
    t[0, : V // 3] = float("-inf")  # masked teacher vocabulary (never the whole row)
    if divergence == "reverse_kl":
        s[0, : V // 3] = float("-inf")  # shared mask (student mass there would make it +inf)
    y = torch.randint(0, V, (N,), generator=g)
    y[3] = -100
    return s, t, y


@pytest.mark.parametrize("isa", ISAS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("V", [1, 5, 16, 2049, 4099])
@pytest.mark.parametrize("divergence", ["kl", "ce", "reverse_kl", "jsd", "tvd"])
def test_every_isa_matches_float64_reference(isa, dtype, V, divergence, seed):
    s, t, y = _case(dtype, V, seed=seed, divergence=divergence)
    kw = dict(temperature=2.5, soft_weight=0.7, hard_weight=0.4, divergence=divergence, beta=0.3)
    s1 = s.clone().requires_grad_()
    t1 = t.clone().requires_grad_()
    loss = kdfused.kd_loss(s1, t1, y, **kw)
    loss.backward()
    s2 = s.double().requires_grad_()
    t2 = t.double().requires_grad_()
    ref = kdfused.reference.kd_loss(s2, t2, y, **kw)
    ref.backward()
    low = dtype in (torch.float16, torch.bfloat16)
    rtol, atol = (2e-2, 2e-3) if low else (1e-5, 1e-6)
    assert kdfused.build_info()["cpu_isa"] == isa
    torch.testing.assert_close(loss.double(), ref, rtol=rtol, atol=atol)
    keep = _tvd_well_posed(s2, t2, kw["temperature"]) if divergence == "tvd" else None
    for got, want in ((s1.grad.double(), s2.grad), (t1.grad.double(), t2.grad)):
        if keep is not None:
            got, want = got[keep], want[keep]
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol)


def _tvd_well_posed(s, t, temperature):
    """TVD's gradient at an element is +-(its probability) / 2T by the sign of p - q, undefined
    where p = q: where the two probabilities agree to within the rounding of the kernel's
    accumulation (float32), the float64 reference may take the other sign. Those elements (a
    handful in a hundred thousand) are left out of the gradient comparison; the loss is compared
    everywhere."""
    with torch.no_grad():
        p = torch.softmax(t.double() / temperature, -1)
        q = torch.softmax(s.double() / temperature, -1)
        keep = (p == q) | ((p - q).abs() > 1e-5 * (p + q))  # (V = 1: p = q = 1 exactly, both 0)
    assert (~keep).float().mean() < 0.1, (
        "a tenth of the elements ambiguous: the test lost its power"
    )
    return keep


def test_isa_names_are_checked():
    from kdfused import _C

    with pytest.raises(ValueError, match="instruction set"):
        _C.set_cpu_isa("sse9")


TOPK_COMBOS = [
    (support, values, divergence)
    for support in SUPPORTS
    for values in VALUE_KINDS
    for divergence in DIVERGENCES
    if not (support == "full" and divergence not in TOPK_DIVERGENCES)
    and not (support == "tail" and values == "logits")
]


@pytest.mark.parametrize("isa", ISAS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("V", [7, 2049])
@pytest.mark.parametrize("support,values,divergence", TOPK_COMBOS)
def test_every_isa_topk_matches_float64_reference(isa, dtype, V, support, values, divergence, seed):
    """topk_kd_loss on every instruction set (the scalar path runs the CUDA kernel's per-element
    code) against the float64 reference, with padding that repeats a valid index, a row without
    any valid entry, an ignored row, the hard term and the student's transform."""
    g = torch.Generator().manual_seed(seed)
    # k <= V / 3: with most of the student's mass on the entries, "tail"'s 1 / (1 - Q) magnifies
    # float32 rounding (a conditioning of the loss, not of the kernel).
    N, k = 6, min(5, V // 3)
    s = (torch.randn(N, V, generator=g) * 3).to(dtype)
    idx = torch.stack([torch.randperm(V, generator=g)[:k] for _ in range(N)])
    t = torch.randn(N, V, generator=g, dtype=torch.float64) * 3
    vals = t if values == "logits" else torch.log_softmax(t, -1)
    vals = vals.gather(1, idx).to(dtype)
    vals[1, 1:] = float("-inf")  # padding ...
    idx[1, 1:] = idx[1, 0]  # ... repeating a valid index, as TRL pads
    vals[2] = float("-inf")  # no support: only the hard term
    y = torch.randint(0, V, (N,), generator=g)
    y[3] = -100
    kw = dict(temperature=2.0, soft_weight=0.8, hard_weight=0.3, divergence=divergence, beta=0.3)
    kw.update(support=support, values=values, student_logit_scale=1.1)
    s1 = s.clone().requires_grad_()
    loss = kdfused.topk_kd_loss(s1, idx, vals, y, **kw)
    loss.backward()
    s2 = s.double().requires_grad_()
    ref = kdfused.reference.topk_kd_loss(s2, idx, vals.double(), y, **kw)
    ref.backward()
    assert kdfused.build_info()["cpu_isa"] == isa
    rtol, atol = (2e-2, 2e-3) if dtype == torch.bfloat16 else (1e-5, 1e-6)
    torch.testing.assert_close(loss.double(), ref, rtol=rtol, atol=atol)
    torch.testing.assert_close(s1.grad.double(), s2.grad, rtol=rtol, atol=atol)
