"""What tests/test_topk.py and tests/test_topk_conventions.py share: kdfused.topk_kd_loss and the
float64 reference (kdfused.reference.topk_kd_loss, autograd) run on the same inputs, the
tolerances between them, and the comparison."""

from __future__ import annotations

import math

import torch

import kdfused
from kdfused.reference import topk_kd_loss as ref_topk_kd_loss

F64 = torch.float64


def run_fused(s, idx, vals, y, **kw):
    """(loss, student gradient) of kdfused.topk_kd_loss, backward with grad_output 1."""
    s1 = s.detach().clone().requires_grad_()
    loss = kdfused.topk_kd_loss(s1, idx, vals, y, **kw)
    loss.backward(torch.ones_like(loss))
    return loss.detach(), s1.grad  # detached: the graph (and s1 with its .grad) can go


def run_ref(s, idx, vals, y, **kw):
    """The same from the reference in float64 (a zero gradient when both weights are 0)."""
    s2 = s.detach().to(F64).requires_grad_()
    loss = ref_topk_kd_loss(s2, idx, vals.to(F64), y, **kw)
    if not loss.requires_grad:  # both weights 0: a constant
        return loss, torch.zeros_like(s2)
    loss.backward(torch.ones_like(loss))
    return loss, s2.grad


def tolerances(dtype, vdtype, kw, V):
    """(loss atol, loss rtol, grad atol, grad rtol) against the float64 reference: float32
    accumulation errors (exp and log) ~1e-6 relative on terms of size log V, times T^2 (loss) or
    T (gradient); the gradient is rounded once to the student's dtype; 16-bit teacher values are
    rounded before either side reads them (the reference reads the same rounded values)."""
    T = kw.get("temperature", 1.0)
    sw, hw = kw.get("soft_weight", 1.0), kw.get("hard_weight", 0.0)
    eps = 1e-12 if F64 in (dtype, vdtype) else 3e-6
    lv = 1.0 + math.log(V)
    loss_atol = eps * lv * 4 * (sw * T * T + hw)
    g_round = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7, torch.float32: 2.0**-22}.get(
        dtype, 0.0
    )
    grad_atol = eps * 4 * (sw * T + hw) + g_round * (sw * T + hw) * 0.05
    return loss_atol, max(eps * 10, 1e-12), grad_atol, max(eps * 10, g_round)


def check_against_ref(s, idx, vals, y, **kw):
    """kdfused.topk_kd_loss's loss and gradient: the accumulation dtype, finite, and within
    tolerances() of the reference's. Returns (loss, gradient)."""
    loss, grad = run_fused(s, idx, vals, y, **kw)
    rloss, rgrad = run_ref(s, idx, vals, y, **kw)
    la, lr, ga, gr = tolerances(s.dtype, vals.dtype, kw, s.shape[-1])
    acc = F64 if F64 in (s.dtype, vals.dtype) else torch.float32
    assert loss.dtype == acc
    assert grad.dtype == s.dtype and grad.shape == s.shape
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    torch.testing.assert_close(loss.double().cpu(), rloss.cpu(), atol=la, rtol=lr)
    torch.testing.assert_close(grad.double().cpu(), rgrad.cpu(), atol=ga, rtol=gr)
    return loss, grad
