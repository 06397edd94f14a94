"""The one backward of every op: the gradients computed by the forward, scaled to grad_output.

Every forward (``kd_loss``, ``linear_kd_loss``, ``topk_kd_loss``, their vocabulary-parallel forms,
:class:`kdfused.KDLossFunction`) returns the gradients of the reduced loss for grad_output = 1, and
leaves on ``ctx``:

- ``kd_need``: one flag per gradient slot (the op's leading inputs), whether it was asked for;
- ``kd_grads``: those gradients (one per slot, an empty tensor where not asked for) followed by
  the op's grad_scale, which ``kd_scale_grads_`` updates in place; or
- ``kd_recompute``: a function ``(ctx, grad_output) -> gradients``, where the gradients are
  computed again in backward (reduction "none" of the linear ops) or scaled otherwise.

The scaling works in place and decides on the device whether there is anything to do, so
``loss.backward()`` costs no pass over the gradients and no host-device sync. When the graph is
retained for another backward, it works on copies, so any sequence of grad_outputs stays exact.
"""

from __future__ import annotations

import torch


def traced(t: torch.Tensor) -> bool:
    # Under torch.compile / AOTAutograd the backward is traced into a functional graph, where an
    # in-place update of a saved forward output is not allowed: use an out-of-place scaling there.
    return torch.compiler.is_compiling() or type(t) is not torch.Tensor


def graph_kept() -> bool:
    keep = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    return True if keep is None else bool(keep())


def no_double_backward(op: str) -> RuntimeError:
    # The saved gradients are constants to autograd, so a second derivative through them would
    # silently come out as zero. Refuse rather than be wrong.
    return RuntimeError(f"kdfused.{op} does not support double backward (create_graph=True)")


def with_entropy(ctx, loss: torch.Tensor, entropy):
    """A forward's return value: ``loss``, or ``(loss, entropy)`` with the entropy marked
    non-differentiable (``entropy`` None: not asked for)."""
    if entropy is None:
        return loss
    ctx.mark_non_differentiable(entropy)
    return loss, entropy


def keep(ctx, need: tuple, grads: tuple) -> None:
    """What :func:`backward` reads: ``need`` (a flag per slot), ``grads`` (the gradients, then
    the grad_scale)."""
    # Plain attributes, not save_for_backward: kd_scale_grads_ updates them in place, and the
    # version check of saved tensors would (rightly, in general) refuse a second backward.
    ctx.kd_need = need
    ctx.kd_grads = grads


def setup_context(ctx, output, need: tuple, keep_grads: bool = True, results: int = 0) -> None:
    """The setup_context of an op that returns (loss, gradients..., grad_scale), then
    ``results`` outputs without gradient that are not backward state (the entropy)."""
    ctx.mark_non_differentiable(*output[1:])
    # The backward receives no gradient for those outputs; don't let autograd fill an N x V zeros
    # tensor for each of them.
    ctx.set_materialize_grads(False)
    state = tuple(output[1 : len(output) - results])
    keep(ctx, need, state if keep_grads else None)


def _scale_in_place(grads: tuple, scale: torch.Tensor, grad_output: torch.Tensor) -> None:
    # kd_scale_grads_ scales two gradients per call and records grad_output in its scale: every
    # call but the last gets a copy of the scale, so that the later ones still scale from the old
    # one. (In place, and not at all when grad_output == 1: the op compares on the device.)
    for i in range(0, len(grads), 2):
        pair = grads[i : i + 2]
        last = i + 2 >= len(grads)
        second = pair[1] if len(pair) == 2 else pair[0].new_empty((0,))
        torch.ops.kdfused.kd_scale_grads_(
            pair[0], second, scale if last else scale.clone(), grad_output
        )


def backward(ctx, grad_loss, n_inputs: int, op: str) -> tuple:
    """The gradients of the op's ``n_inputs`` inputs for ``grad_loss`` (None where not needed),
    from what the forward left on ``ctx`` (see the module docstring). ``op`` names the op in the
    double-backward error."""
    need = ctx.kd_need
    rest = (None,) * (n_inputs - len(need))
    recompute = getattr(ctx, "kd_recompute", None)
    if recompute is not None:
        if grad_loss is None:
            return (None,) * n_inputs
        if torch.is_grad_enabled() and not traced(grad_loss):
            raise no_double_backward(op)
        grads = recompute(ctx, grad_loss)
        return tuple(g if n else None for g, n in zip(grads, need)) + rest
    *grads, scale = ctx.kd_grads
    if grad_loss is not None and traced(grad_loss):
        g = grad_loss.unsqueeze(-1) if grad_loss.dim() > 0 else grad_loss
        return tuple(x * g if n else None for x, n in zip(grads, need)) + rest
    kept = graph_kept()
    if not kept:
        # Last backward through this graph: let go of the saved gradients, so that autograd can
        # hand them on (e.g. into a leaf's .grad) without a copy, and the memory goes with them.
        ctx.kd_grads = None
    if grad_loss is None or not any(need):
        return (None,) * n_inputs
    if torch.is_grad_enabled():
        raise no_double_backward(op)
    if kept:
        # retain_graph=True: another backward may follow with another grad_output, so the saved
        # gradients stay as they are and this one is scaled in a copy (one pass).
        grads = [x.clone() for x in grads]
        scale = scale.clone()
    _scale_in_place(grads, scale, grad_loss)
    return tuple(x if n else None for x, n in zip(grads, need)) + rest
