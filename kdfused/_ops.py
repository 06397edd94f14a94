"""Typed wrappers over ``torch.ops.kdfused.*``: fake (meta) kernels and autograd registration.

The forward op returns the loss *and* the gradients of the reduced loss for grad_output = 1, which
the backward only has to scale. That scaling is itself an op (``kd_scale_grads_``) that works in
place and decides on the device whether there is anything to do, so ``loss.backward()`` costs no
pass over the N x V gradient and no host-device sync. When the graph is retained for another
backward, the scaling works on a copy instead, so any sequence of grad_outputs stays exact.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import _C  # noqa: F401  (loads the library that defines torch.ops.kdfused)

_lib_ops = torch.ops.kdfused


def _acc_dtype(a: torch.Tensor, b: torch.Tensor) -> torch.dtype:
    return torch.float64 if torch.float64 in (a.dtype, b.dtype) else torch.float32


@torch.library.register_fake("kdfused::kd_loss")
def _kd_loss_fake(
    student,
    teacher,
    labels,
    temperature,
    soft_weight,
    hard_weight,
    divergence,
    beta,
    ignore_index,
    reduction,
    grad_student,
    grad_teacher,
):
    # The same checks as the real kernels (one C++ function), where shapes are concrete; with
    # symbolic shapes they run when the compiled graph calls the real kernel.
    if not any(
        isinstance(d, torch.SymInt)
        for x in (student, teacher, labels)
        if x is not None
        for d in x.shape
    ):
        _C.check_inputs(
            student,
            teacher,
            labels,
            temperature,
            soft_weight,
            hard_weight,
            divergence,
            beta,
            reduction,
        )
    acc = _acc_dtype(student, teacher)
    loss_shape = student.shape[:-1] if reduction == "none" else ()
    loss = student.new_empty(loss_shape, dtype=acc)
    gs = (
        torch.empty(student.shape, dtype=student.dtype, device=student.device)
        if grad_student
        else student.new_empty((0,))
    )
    gt = (
        torch.empty(teacher.shape, dtype=teacher.dtype, device=teacher.device)
        if grad_teacher
        else teacher.new_empty((0,))
    )
    return loss, gs, gt, torch.empty_like(loss)


@torch.library.register_fake("kdfused::kd_scale_grads_")
def _kd_scale_grads_fake(grad_student, grad_teacher, grad_scale, grad_output):
    return None


def _setup_context(ctx, inputs, output):
    _, gs, gt, scale = output
    ctx.mark_non_differentiable(gs, gt, scale)
    # The backward receives no gradient for those outputs; don't let autograd fill an N x V zeros
    # tensor for each of them.
    ctx.set_materialize_grads(False)
    # Plain attributes, not save_for_backward: kd_scale_grads_ updates them in place, and the
    # version check of saved tensors would (rightly, in general) refuse a second backward.
    ctx.kd_grads = (gs, gt, scale)
    ctx.kd_need = (inputs[10], inputs[11])  # grad_student, grad_teacher flags


def _traced(t: torch.Tensor) -> bool:
    # Under torch.compile / AOTAutograd the backward is traced into a functional graph, where an
    # in-place update of a saved forward output is not allowed: use an out-of-place scaling there.
    return torch.compiler.is_compiling() or type(t) is not torch.Tensor


def _graph_kept() -> bool:
    keep = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    return True if keep is None else bool(keep())


def saved_grads_backward(ctx, grad_loss):
    """The backward of kd_loss: the gradients the forward saved on ``ctx`` (``ctx.kd_grads`` =
    (grad_student, grad_teacher, grad_scale), ``ctx.kd_need`` = which of them were asked for),
    scaled to ``grad_loss``. Returns (grad_student or None, grad_teacher or None).

    Shared by the op's registered autograd (``_backward``) and :class:`kdfused.KDLossFunction`:
    one implementation of the in-place scaling, the retain_graph copy, the traced path and the
    refusal of double backward.
    """
    gs, gt, scale = ctx.kd_grads
    need_s, need_t = ctx.kd_need
    if grad_loss is not None and _traced(grad_loss):
        g = grad_loss.unsqueeze(-1) if grad_loss.dim() > 0 else grad_loss
        return (gs * g if need_s else None), (gt * g if need_t else None)
    kept = _graph_kept()
    if not kept:
        # Last backward through this graph: let go of the saved gradients, so that autograd can
        # hand them on (e.g. into a leaf's .grad) without a copy, and the memory goes with them.
        ctx.kd_grads = None
    if grad_loss is None:
        return None, None
    if torch.is_grad_enabled():
        # create_graph=True: the saved gradients are constants to autograd, so a second derivative
        # through them would silently come out as zero. Refuse rather than be wrong.
        raise RuntimeError("kdfused.kd_loss does not support double backward (create_graph=True)")
    if kept:
        # retain_graph=True: another backward may follow with another grad_output, so the saved
        # gradients stay as they are and this one is scaled in a copy (one pass).
        gs, gt, scale = gs.clone(), gt.clone(), scale.clone()
    # The usual loss.backward(): scaled in place, and not at all when grad_output == 1 (the op
    # compares on the device, no sync).
    torch.ops.kdfused.kd_scale_grads_(gs, gt, scale, grad_loss)
    return (gs if need_s else None), (gt if need_t else None)


def _backward(ctx, grad_loss, _gs, _gt, _scale):
    return saved_grads_backward(ctx, grad_loss) + (None,) * 10


torch.library.register_autograd("kdfused::kd_loss", _backward, setup_context=_setup_context)


def kd_loss_op(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: Optional[torch.Tensor],
    temperature: float,
    soft_weight: float,
    hard_weight: float,
    divergence: str,
    beta: float,
    ignore_index: int,
    reduction: str,
) -> torch.Tensor:
    """Calls the fused op, asking for the gradients that autograd will need (none under no_grad)."""
    grad_on = torch.is_grad_enabled()
    need_s = grad_on and student.requires_grad
    need_t = grad_on and teacher.requires_grad
    loss, _, _, _ = _lib_ops.kd_loss(
        student,
        teacher,
        labels,
        float(temperature),
        float(soft_weight),
        float(hard_weight),
        divergence,
        float(beta),
        int(ignore_index),
        reduction,
        need_s,
        need_t,
    )
    return loss
