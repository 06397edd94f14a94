"""Autograd behaviour: grad_output != 1, reduction="none" with a weight vector, retain_graph and
repeated backward, gradient accumulation, no_grad, which inputs get gradients, views/expand,
non-leaf inputs, and torch.autograd.gradcheck in float64 for both inputs.

Size: one file for every backward behaviour (scaling, retain_graph, compile, double backward),
which share their fixtures.
"""

from __future__ import annotations

import pytest
import torch

from oracle import (
    acc_dtype,
    assert_grad,
    assert_matches,
    check_against_oracle,
    loss_dtype_for,
    make_labels,
    make_logits,
    oracle,
)
from params import DT, REDUCTIONS
from params import ctx as _ctx


def _inputs(device, gen, dtype=torch.float32, shape=(3, 4, 29), ignore=0.25):
    s = make_logits(shape, dtype, device, gen)
    t = make_logits(shape, dtype, device, gen)
    labels = make_labels(shape[:-1], shape[-1], device, gen, ignore)
    return s, t, labels


KW = dict(temperature=2.5, soft_weight=0.7, hard_weight=0.3)


def _cmp_grads(got_s, got_t, ref, s, t, seed, what="", teacher=True, roundings=2):
    """Compares the student gradient and, when `teacher`, the teacher gradient with the oracle
    (by default allowing two roundings to the gradient dtype: see oracle.assert_matches)."""
    kw = dict(acc=acc_dtype(s.dtype, t.dtype), what=what, ctx=_ctx(seed), roundings=roundings)
    assert_grad(got_s, ref, "student", s, **kw)
    if teacher:
        assert_grad(got_t, ref, "teacher", t, **kw)


@pytest.mark.parametrize("dtype", DT)
@pytest.mark.parametrize("divergence", ["kl", "ce"])
@pytest.mark.parametrize("reduction", ["batchmean", "mean", "sum"])
def test_scalar_grad_output(kd_loss, device, gen, seed, reduction, divergence, dtype):
    """(loss * c).backward() and loss.backward(c) scale both gradients by c."""
    s, t, labels = _inputs(device, gen, dtype)
    kw = dict(KW, divergence=divergence, reduction=reduction)
    for c in [3.7, -0.3, 0.0, 1e-3]:
        # loss.backward(grad_output)
        go = torch.tensor(c, dtype=loss_dtype_for(dtype, dtype), device=device)
        check_against_oracle(
            kd_loss,
            s,
            t,
            labels,
            grad_teacher=True,
            grad_output=go,
            ctx=_ctx(seed, c=c, **kw),
            **kw,
        )
        # (loss * c).backward()
        s_ = s.clone().requires_grad_(True)
        t_ = t.clone().requires_grad_(True)
        (kd_loss(s_, t_, labels, **kw) * c).backward()
        ref = oracle(s, t, labels, grad_output=go, **kw)
        _cmp_grads(s_.grad, t_.grad, ref, s, t, seed, f"(loss*{c})")


@pytest.mark.parametrize("dtype", DT)
@pytest.mark.parametrize("divergence", ["kl", "ce"])
def test_none_weighted(kd_loss, device, gen, seed, divergence, dtype):
    """reduction="none" followed by a random per-row weighting: row r's gradient scales by w_r,
    both through loss.backward(w) and through (loss * w).sum().backward()."""
    s, t, labels = _inputs(device, gen, dtype)
    kw = dict(KW, divergence=divergence, reduction="none")
    ldt = loss_dtype_for(dtype, dtype)
    w = (torch.randn(labels.shape, generator=gen, dtype=torch.float64) * 2).to(ldt).to(device)
    check_against_oracle(
        kd_loss, s, t, labels, grad_teacher=True, grad_output=w, ctx=_ctx(seed, **kw), **kw
    )
    s_ = s.clone().requires_grad_(True)
    t_ = t.clone().requires_grad_(True)
    (kd_loss(s_, t_, labels, **kw) * w).sum().backward()
    ref = oracle(s, t, labels, grad_output=w, **kw)
    _cmp_grads(s_.grad, t_.grad, ref, s, t, seed, "(loss*w).sum()")


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("grad_teacher", [False, True], ids=["s", "s+t"])
def test_retain_graph_repeated_backward(kd_loss, device, gen, seed, reduction, grad_teacher):
    """retain_graph=True, then backward again with the same and with different grad_outputs:
    the gradients accumulate as sum_k c_k * g (a kernel that scales its saved gradient in place,
    or hands the saved buffer to .grad and lets it be accumulated into, fails here)."""
    s, t, labels = _inputs(device, gen, torch.float32)
    kw = dict(KW, reduction=reduction)
    s_ = s.clone().requires_grad_(True)
    t_ = t.clone().requires_grad_(grad_teacher)
    loss = kd_loss(s_, t_, labels, **kw)
    if reduction == "none":
        base = torch.rand(labels.shape, generator=gen) + 0.5
        zeros_some = base.clone()
        zeros_some.view(-1)[::2] = 0.0
        gos = [None, base, base * -2.0, zeros_some, None, torch.zeros_like(base), base * 0.25]
    else:
        gos = [
            None,
            torch.tensor(2.0),
            torch.tensor(-0.5),
            torch.tensor(0.0),
            None,
            torch.tensor(1.0),
        ]
    total = total_abs = None
    for k, go in enumerate(gos):
        if go is None:
            (loss if loss.dim() == 0 else loss.sum()).backward(retain_graph=True)
            go_eff = torch.ones(labels.shape) if reduction == "none" else torch.tensor(1.0)
        else:
            loss.backward(go.to(device), retain_graph=True)
            go_eff = go.cpu()
        total = go_eff.double() if total is None else total + go_eff.double()
        total_abs = go_eff.double().abs() + (0 if total_abs is None else total_abs)
        ref = oracle(s, t, labels, grad_output=total, **kw)
        # error budget: every backward's contribution (sum_k |c_k| g), rounded once per step
        bud = oracle(s, t, labels, grad_output=total_abs, **kw)
        what = f"after backward #{k + 1} (grad_outputs so far: {gos[: k + 1]})"
        cmp = dict(acc=torch.float32, what=what, ctx=_ctx(seed))
        assert_grad(
            s_.grad, ref, "student", s, err=bud.grad_s_err + (k + 1) * bud.grad_s.abs(), **cmp
        )
        if grad_teacher:
            assert_grad(
                t_.grad, ref, "teacher", t, err=bud.grad_t_err + (k + 1) * bud.grad_t.abs(), **cmp
            )
        else:
            assert t_.grad is None


def test_grad_accumulates_into_existing(kd_loss, device, gen, seed):
    """A second forward+backward adds to .grad; the first result is not modified afterwards."""
    s, t, labels = _inputs(device, gen, torch.float32)
    s_ = s.clone().requires_grad_(True)
    t_ = t.clone().requires_grad_(True)
    kd_loss(s_, t_, labels, **KW).backward()
    g1s, g1t = s_.grad.clone(), t_.grad.clone()
    held = s_.grad  # the tensor autograd stored first; accumulation may be in place
    kd_loss(s_, t_, labels, **KW).backward()
    torch.testing.assert_close(s_.grad, 2 * g1s, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(t_.grad, 2 * g1t, rtol=1e-6, atol=1e-9)
    del held
    # a fresh call still gives g1 (nothing cached across calls)
    s2 = s.clone().requires_grad_(True)
    kd_loss(s2, t, labels, **KW).backward()
    assert torch.equal(s2.grad, g1s)


def test_loss_used_twice(kd_loss, device, gen, seed):
    s, t, labels = _inputs(device, gen, torch.float64)
    s_ = s.clone().requires_grad_(True)
    t_ = t.clone().requires_grad_(True)
    loss = kd_loss(s_, t_, labels, **KW)
    (loss + 2.0 * loss).backward()
    ref = oracle(s, t, labels, grad_output=torch.tensor(3.0), **KW)
    _cmp_grads(s_.grad, t_.grad, ref, s, t, seed)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_no_grad(kd_loss, device, gen, seed, reduction):
    """Under torch.no_grad() (or with inputs that do not require grad) it just returns the
    loss: same value, no graph, nothing attached to the inputs."""
    s, t, labels = _inputs(device, gen, torch.float32)
    kw = dict(KW, reduction=reduction)
    s_ = s.clone().requires_grad_(True)
    t_ = t.clone().requires_grad_(True)
    with torch.no_grad():
        l0 = kd_loss(s_, t_, labels, **kw)
    assert not l0.requires_grad and l0.grad_fn is None
    l1 = kd_loss(s, t, labels, **kw)  # no input requires grad
    assert not l1.requires_grad and l1.grad_fn is None
    l2 = kd_loss(s_, t_, labels, **kw)
    assert l2.requires_grad
    assert torch.equal(l0, l1) and torch.equal(l0, l2.detach())
    assert s_.grad is None and t_.grad is None
    ref = oracle(s, t, labels, **kw)
    assert_matches(
        l0,
        ref.loss,
        ref.loss_err,
        out_dtype=torch.float32,
        V=s.shape[-1],
        acc=torch.float32,
        what="loss under no_grad",
        ctx=_ctx(seed),
    )


@pytest.mark.parametrize("dtype", DT)
def test_teacher_only_requires_grad(kd_loss, device, gen, seed, dtype):
    s, t, labels = _inputs(device, gen, dtype)
    t_ = t.clone().requires_grad_(True)
    loss = kd_loss(s, t_, labels, **KW)
    assert loss.requires_grad
    loss.backward()
    ref = oracle(s, t, labels, **KW)
    assert_grad(t_.grad, ref, "teacher", t, ctx=_ctx(seed))


@pytest.mark.parametrize("dtype", DT)
def test_student_only_requires_grad(kd_loss, device, gen, seed, dtype):
    s, t, labels = _inputs(device, gen, dtype)
    s_ = s.clone().requires_grad_(True)
    kd_loss(s_, t, labels, **KW).backward()
    assert t.grad is None
    ref = oracle(s, t, labels, **KW)
    _cmp_grads(s_.grad, None, ref, s, t, seed, teacher=False)


def test_grad_through_row_strided_view(kd_loss, device, gen, seed):
    """logits[:, :-1] of a (B, L, V) leaf (the language-model shift): the leaf's gradient is the
    oracle's in the first L-1 positions and exactly 0 in the last."""
    B, L, V = 2, 6, 51
    sb = make_logits((B, L, V), torch.float32, device, gen).requires_grad_(True)
    tb = make_logits((B, L, V), torch.float32, device, gen).requires_grad_(True)
    labels = make_labels((B, L - 1), V, device, gen, 0.2)
    loss = kd_loss(sb[:, :-1], tb[:, 1:], labels, **KW)
    loss.backward()
    ref = oracle(sb[:, :-1], tb[:, 1:], labels, **KW)
    _cmp_grads(sb.grad[:, :-1], tb.grad[:, 1:], ref, sb[:, :-1], tb[:, 1:], seed)
    assert (sb.grad[:, -1] == 0).all() and (tb.grad[:, 0] == 0).all()


def test_grad_through_expanded_teacher(kd_loss, device, gen, seed):
    """A teacher broadcast over rows (stride 0): its gradient sums over the rows."""
    N, V = 5, 40
    s = make_logits((N, V), torch.float64, device, gen)
    t0 = make_logits((1, V), torch.float64, device, gen).requires_grad_(True)
    s_ = s.clone().requires_grad_(True)
    kd_loss(s_, t0.expand(N, V), None, temperature=2.0).backward()
    ref = oracle(s, t0.expand(N, V), None, temperature=2.0)
    torch.testing.assert_close(s_.grad.cpu(), ref.grad_s, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(
        t0.grad.cpu(), ref.grad_t.sum(0, keepdim=True), rtol=1e-10, atol=1e-13
    )


def test_non_leaf_inputs(kd_loss, device, gen, seed):
    """Logits produced by a layer: gradients reach the layer's parameters by the chain rule."""
    N, H, V = 6, 8, 33
    x = torch.randn((N, H), generator=gen, dtype=torch.float64).to(device)
    Ws = torch.randn((H, V), generator=gen, dtype=torch.float64).to(device).requires_grad_(True)
    Wt = torch.randn((H, V), generator=gen, dtype=torch.float64).to(device).requires_grad_(True)
    labels = make_labels((N,), V, device, gen, 0.2)
    s, t = x @ Ws, x @ Wt
    kd_loss(s, t, labels, **KW).backward()
    ref = oracle(s, t, labels, **KW)
    torch.testing.assert_close(Ws.grad.cpu(), x.cpu().T @ ref.grad_s, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(Wt.grad.cpu(), x.cpu().T @ ref.grad_t, rtol=1e-9, atol=1e-12)


# ------------------------------------------------------------------------------------------------
# gradcheck (float64, both inputs)
# ------------------------------------------------------------------------------------------------


GC_OPTIONS = ("divergence", "reduction", "soft_weight", "hard_weight", "temperature")


def _gc_case(case_id, with_labels, *options):
    """A gradcheck case: kd_loss's GC_OPTIONS, in that order, and whether it gets labels."""
    assert len(options) == len(GC_OPTIONS), case_id
    return pytest.param(dict(zip(GC_OPTIONS, options)), with_labels, id=case_id)


GC_CASES = [
    _gc_case("kl-batchmean-soft", False, "kl", "batchmean", 1.0, 0.0, 2.0),
    _gc_case("kl-sum-mix", True, "kl", "sum", 0.6, 0.4, 0.7),
    _gc_case("ce-mean-mix", True, "ce", "mean", 0.5, 1.5, 3.0),
    _gc_case("ce-none-soft", False, "ce", "none", 1.0, 0.0, 1.0),
    _gc_case("kl-none-mix", True, "kl", "none", 0.3, 0.7, 4.0),
    _gc_case("hard-only", True, "kl", "batchmean", 0.0, 1.0, 1.0),
]


@pytest.mark.parametrize("shape", [(3, 5), (2, 2, 4)], ids=str)
@pytest.mark.parametrize("kw,with_labels", GC_CASES)
def test_gradcheck(kd_loss, device, gen, seed, kw, with_labels, shape):
    s = make_logits(shape, torch.float64, device, gen, scale=1.5).requires_grad_(True)
    t = make_logits(shape, torch.float64, device, gen, scale=1.5).requires_grad_(True)
    labels = make_labels(shape[:-1], shape[-1], device, gen, 0.3) if with_labels else None
    if labels is not None:
        labels.view(-1)[0] = 1  # at least one valid row
    assert torch.autograd.gradcheck(
        lambda a, b: kd_loss(a, b, labels, **kw), (s, t), eps=1e-6, atol=1e-7, rtol=1e-5
    )


@pytest.mark.parametrize("kw,with_labels", GC_CASES[:3])
def test_gradcheck_student_only(kd_loss, device, gen, seed, kw, with_labels):
    s = make_logits((3, 6), torch.float64, device, gen, scale=1.5).requires_grad_(True)
    t = make_logits((3, 6), torch.float64, device, gen, scale=1.5)
    labels = make_labels((3,), 6, device, gen, 0.0) if with_labels else None
    assert torch.autograd.gradcheck(
        lambda a: kd_loss(a, t, labels, **kw), (s,), eps=1e-6, atol=1e-7, rtol=1e-5
    )


@pytest.mark.parametrize("reduction", ["sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_grad_output_not_rounded_to_grad_dtype(kd_loss, device, gen, seed, dtype, reduction):
    """grad_output = 1 + 2^-9 (bf16) / 1 + 2^-12 (f16) rounds to exactly 1 in the gradient's dtype.
    Scaling with the rounded grad_output biases every gradient element by that relative amount;
    scaling in float32 does not. Measured as the mean signed relative error over ~4000 elements,
    which must be well below the bias."""
    bump = 2.0**-9 if dtype == torch.bfloat16 else 2.0**-12
    assert (torch.tensor(1.0 + bump).to(dtype) == 1.0).item()
    s, t, labels = _inputs(device, gen, dtype, shape=(8, 500), ignore=0.0)
    kw = dict(KW, reduction=reduction)
    ldt = torch.float32
    go = torch.full(
        labels.shape if reduction == "none" else (), 3.0 * (1.0 + bump), dtype=ldt, device=device
    )
    s_ = s.clone().requires_grad_(True)
    t_ = t.clone().requires_grad_(True)
    kd_loss(s_, t_, labels, **kw).backward(go)
    ref = oracle(s, t, labels, grad_output=go, **kw)
    for got, exp, what in [
        (s_.grad, ref.grad_s, "grad_student"),
        (t_.grad, ref.grad_t, "grad_teacher"),
    ]:
        exp = exp.reshape(-1)
        got = got.double().cpu().reshape(-1)
        sel = exp.abs() > 1e-4 * exp.abs().max()
        bias = ((got[sel] - exp[sel]) / exp[sel]).mean().item()
        assert abs(bias) < bump / 4, (
            f"{what}: mean relative error {bias:.3e} ~ -{bump:.3e}: grad_output was rounded to "
            f"{dtype} before scaling{_ctx(seed)}"
        )


@pytest.mark.fused_only
def test_double_backward_is_refused(kdfused_mod):
    """create_graph=True would need the derivative of the saved gradient: refused, never zero."""
    s = torch.randn(3, 11, requires_grad=True)
    t = torch.randn(3, 11)
    loss = kdfused_mod.kd_loss(s, t, temperature=2.0)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss, s, create_graph=True)
