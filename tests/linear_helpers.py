"""What the tests of the linear ops (tests/test_linear.py, tests/test_linear_topk.py) share: the
run's seed and each test's generator, random student layers and labels, the float64 loss and
student gradients through F.linear on the CPU, and the comparison of the op's with them."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from conftest import RUN_SEED, seed_for

SEED = RUN_SEED
F64 = torch.float64
# max abs error relative to the float64 result's largest magnitude, by input dtype
TOL = {F64: 1e-10, torch.float32: 2e-5, torch.float16: 1e-2, torch.bfloat16: 4e-2}
STUDENT = ("student_hidden", "student_weight", "student_bias")


def options(divergence="kl", **more) -> dict:
    """The loss options most tests use (T = 2, soft 0.7 + hard 0.4, the JSD's beta 0.3), with
    `more` added or replacing them."""
    base = dict(temperature=2.0, soft_weight=0.7, hard_weight=0.4, divergence=divergence, beta=0.3)
    return {**base, **more}


def generator(nodeid: str) -> torch.Generator:
    """One generator per test, seeded from the run's seed and the test's id: reruns with the same
    KDFUSED_TEST_SEED repeat (in any process)."""
    return torch.Generator().manual_seed(seed_for(nodeid))


def ctx(**kw) -> str:
    return f"[KDFUSED_TEST_SEED={SEED} " + " ".join(f"{k}={v}" for k, v in kw.items()) + "]"


def rnd(gen, *shape, dtype, device, scale=1.0):
    """Standard normal * scale, drawn in float64 on the CPU, then moved and rounded."""
    return (torch.randn(shape, generator=gen, dtype=F64) * scale).to(device=device, dtype=dtype)


def student_layer(gen, lead, H, V, dtype, device, bias=True) -> dict:
    """Student hidden states (lead + (H,)) and lm_head, all requiring grad; the weight is scaled
    so that the logits are O(3)."""

    def param(*shape, scale=1.0):
        return rnd(gen, *shape, dtype=dtype, device=device, scale=scale).requires_grad_()

    return dict(
        student_hidden=param(*lead, H),
        student_weight=param(V, H, scale=3.0 / H**0.5),
        student_bias=param(V, scale=0.5) if bias else None,
    )


def random_labels(gen, lead, V, ignore_frac, device) -> torch.Tensor:
    """Labels in [0, V), each -100 (ignored) with probability ignore_frac."""
    y = torch.randint(0, V, lead, generator=gen)
    drop = torch.rand(lead, generator=gen) < ignore_frac
    return torch.where(drop, torch.full_like(y, -100), y).to(device)


def f64(x):
    return None if x is None else x.detach().to("cpu", F64)


def through_linear(d, loss_of_logits, grad_output=None):
    """(loss, grad hidden, grad weight, grad bias), all float64 on the CPU: loss_of_logits applied
    to F.linear of the student layer in float64, the gradients by autograd."""
    sh = f64(d["student_hidden"]).requires_grad_()
    sw = f64(d["student_weight"]).requires_grad_()
    sb = d["student_bias"]
    sb = f64(sb).requires_grad_() if sb is not None else None
    loss = loss_of_logits(F.linear(sh, sw, sb))
    go = torch.ones_like(loss) if grad_output is None else f64(grad_output)
    grads = torch.autograd.grad(loss, [sh, sw] + ([sb] if sb is not None else []), go)
    return (loss.detach(),) + tuple(grads) + ((None,) if sb is None else ())


def assert_close(got, want, tol, what):
    """Max abs error relative to the reference's max magnitude (gradients have many ~0 entries)."""
    assert got is not None and want is not None, what
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    err = (got.detach().to("cpu", F64) - want).abs().max().item() if want.numel() else 0.0
    scale = max(want.abs().max().item() if want.numel() else 0.0, 1e-12)
    assert err <= tol * scale, f"{what}: max abs err {err:.3e} > {tol:.1e} * {scale:.3e}"


def backward_and_check(d, loss, ref, tol, ctx, grad_output=None):
    """loss.backward(grad_output), then the loss and the gradient of every student tensor that
    requires grad against ``ref`` (through_linear's tuple)."""
    go = torch.ones_like(loss) if grad_output is None else grad_output.to(loss.device, loss.dtype)
    loss.backward(go)
    assert_close(loss, ref[0], tol, f"loss {ctx}")
    for name, want in zip(STUDENT, ref[1:]):
        x = d[name]
        if x is None or not x.requires_grad:
            continue
        assert x.grad is not None, f"{name}: no gradient {ctx}"
        assert x.grad.dtype == x.dtype and x.grad.shape == x.shape, (name, ctx)
        assert_close(x.grad, want, tol, f"grad {name} {ctx}")
    return loss
