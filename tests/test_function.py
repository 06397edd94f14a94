"""kdfused.KDLossFunction, the torch.autograd.Function form of kd_loss: the same loss and
gradients as kd_loss (bitwise), the same backward behaviour (grad_output != 1, retain_graph,
teacher gradients, no_grad, double backward refused) and torch.compile(fullgraph=True)."""

from __future__ import annotations

import pytest
import torch

from oracle import make_labels, make_logits
from params import REDUCTIONS
from params import ctx as _ctx

pytestmark = pytest.mark.fused_only


def _fn():
    import kdfused

    return kdfused.KDLossFunction


def _both(kdfused_mod, s, t, labels, args, beta=None, go=None, grad_teacher=True):
    """(loss, grad_s, grad_t) from KDLossFunction.apply and from kd_loss, same inputs."""
    T, sw, hw, div, ii, red = args
    out = []
    for use_fn in (True, False):
        s_ = s.clone().requires_grad_(True)
        t_ = t.clone().requires_grad_(grad_teacher)
        if use_fn:
            extra = () if beta is None else (beta,)
            loss = kdfused_mod.KDLossFunction.apply(s_, t_, labels, T, sw, hw, div, ii, red, *extra)
        else:
            loss = kdfused_mod.kd_loss(
                s_,
                t_,
                labels,
                temperature=T,
                soft_weight=sw,
                hard_weight=hw,
                divergence=div,
                ignore_index=ii,
                reduction=red,
                beta=0.5 if beta is None else beta,
            )
        if go is None:
            (loss if loss.dim() == 0 else loss.sum()).backward()
        else:
            loss.backward(go)
        out.append((loss.detach(), s_.grad, t_.grad))
    return out


def test_is_an_autograd_function(kdfused_mod):
    assert issubclass(kdfused_mod.KDLossFunction, torch.autograd.Function)
    assert kdfused_mod.KDLossFunction is _fn()


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("divergence", ["kl", "ce"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_equals_kd_loss(kdfused_mod, device, gen, seed, dtype, divergence, reduction):
    s = make_logits((3, 4, 53), dtype, device, gen)
    t = make_logits((3, 4, 53), dtype, device, gen)
    labels = make_labels((3, 4), 53, device, gen, 0.25)
    args = (2.5, 0.7, 0.3, divergence, -100, reduction)
    for go in (
        None,
        (torch.rand((3, 4) if reduction == "none" else (), generator=gen) + 0.5).to(device),
    ):
        a, b = _both(kdfused_mod, s, t, labels, args, go=go)
        for x, y, what in zip(a, b, ["loss", "grad_student", "grad_teacher"]):
            assert torch.equal(x, y), f"{what} differs{_ctx(seed, go=go, reduction=reduction)}"


def test_beta_positional_and_default(kdfused_mod, device, gen):
    """beta is the last, optional positional argument (default 0.5), passed on to the op."""
    s = make_logits((4, 30), torch.float32, device, gen)
    t = make_logits((4, 30), torch.float32, device, gen)
    F = kdfused_mod.KDLossFunction
    with pytest.raises(ValueError, match=r"beta must be in \[0, 1\]"):
        F.apply(s, t, None, 2.0, 1.0, 0.0, "jsd", -100, "sum", 1.5)
    with pytest.raises(TypeError, match="beta"):
        F.apply(s, t, None, 2.0, 1.0, 0.0, "jsd", -100, "sum", "0.5")
    # "kl" ignores beta: any valid value gives the same loss as the default
    a = F.apply(s, t, None, 2.0, 1.0, 0.0, "kl", -100, "sum")
    b = F.apply(s, t, None, 2.0, 1.0, 0.0, "kl", -100, "sum", 0.25)
    assert torch.equal(a, b)


def test_labels_none_and_teacher_only(kdfused_mod, device, gen):
    s = make_logits((5, 17), torch.float64, device, gen)
    t = make_logits((5, 17), torch.float64, device, gen)
    t1 = t.clone().requires_grad_(True)
    t2 = t.clone().requires_grad_(True)
    kdfused_mod.KDLossFunction.apply(s, t1, None, 3.0, 1.0, 0.0, "kl", -100, "mean").backward()
    kdfused_mod.kd_loss(s, t2, temperature=3.0, reduction="mean").backward()
    assert torch.equal(t1.grad, t2.grad)


def test_retain_graph(kdfused_mod, device, gen):
    """retain_graph=True and several grad_outputs: the gradients accumulate as with kd_loss."""
    s = make_logits((6, 40), torch.float32, device, gen)
    t = make_logits((6, 40), torch.float32, device, gen)
    labels = make_labels((6,), 40, device, gen, 0.2)
    grads = []
    for use_fn in (True, False):
        s_ = s.clone().requires_grad_(True)
        if use_fn:
            loss = kdfused_mod.KDLossFunction.apply(
                s_, t, labels, 2.0, 0.5, 0.5, "kl", -100, "none"
            )
        else:
            loss = kdfused_mod.kd_loss(
                s_, t, labels, temperature=2.0, soft_weight=0.5, hard_weight=0.5, reduction="none"
            )
        for c in (1.0, 2.0, -0.5, 1.0):
            loss.backward(torch.full_like(loss, c), retain_graph=True)
        grads.append(s_.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)
    s1 = s.clone().requires_grad_(True)
    kdfused_mod.kd_loss(
        s1, t, labels, temperature=2.0, soft_weight=0.5, hard_weight=0.5, reduction="none"
    ).sum().backward()
    torch.testing.assert_close(grads[0], 3.5 * s1.grad, rtol=1e-6, atol=1e-9)


def test_no_grad(kdfused_mod, device, gen):
    s = make_logits((3, 20), torch.float32, device, gen).requires_grad_(True)
    t = make_logits((3, 20), torch.float32, device, gen)
    with torch.no_grad():
        loss = kdfused_mod.KDLossFunction.apply(s, t, None, 2.0, 1.0, 0.0, "kl", -100, "sum")
    assert loss.grad_fn is None
    assert torch.equal(loss, kdfused_mod.kd_loss(s.detach(), t, temperature=2.0, reduction="sum"))


def test_double_backward_is_refused(kdfused_mod):
    s = torch.randn(3, 11, requires_grad=True)
    t = torch.randn(3, 11)
    loss = kdfused_mod.KDLossFunction.apply(s, t, None, 2.0, 1.0, 0.0, "kl", -100, "batchmean")
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss, s, create_graph=True)


@pytest.mark.parametrize("backend", ["inductor", "aot_eager"])
def test_compile_fullgraph(kdfused_mod, device, gen, backend):
    torch._dynamo.reset()

    def f(s, t, y):
        loss = kdfused_mod.KDLossFunction.apply(s, t, y, 2.0, 0.7, 0.3, "kl", -100, "none")
        return (loss * 1.5).sum()

    cf = torch.compile(f, fullgraph=True, backend=backend)
    s = make_logits((2, 5, 50), torch.float32, device, gen)
    t = make_logits((2, 5, 50), torch.float32, device, gen)
    y = make_labels((2, 5), 50, device, gen, 0.3)
    out = []
    for fn in (f, cf):
        s_ = s.clone().requires_grad_(True)
        t_ = t.clone().requires_grad_(True)
        loss = fn(s_, t_, y)
        loss.backward()
        out.append((loss.detach(), s_.grad, t_.grad))
    (le, gse, gte), (lc, gsc, gtc) = out
    torch.testing.assert_close(lc, le, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(gsc, gse, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(gtc, gte, rtol=1e-6, atol=1e-8)
