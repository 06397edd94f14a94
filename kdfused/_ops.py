"""Typed wrappers over ``torch.ops.kdfused.kd_loss``: its fake (meta) kernel and autograd.

The forward op returns the loss *and* the gradients of the reduced loss for grad_output = 1, which
the backward (``kdfused._backward``) only has to scale, with the op ``kd_scale_grads_``.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import _C, _backward, _fake  # (_C: loads the library that defines torch.ops.kdfused)
from ._options import KDOptions

_lib_ops = torch.ops.kdfused
_N_INPUTS = 14  # arguments of kdfused::kd_loss


@torch.library.register_fake("kdfused::kd_loss")
def _kd_loss_fake(student, teacher, labels, *args):
    # args: the options in the schema's order (KDOptions.op_args), return_entropy, then the two
    # gradient flags.
    *options, logit_map, return_entropy, grad_student, grad_teacher = args
    tensors = (student, teacher, labels)
    check_args = options[:5] + options[6:]  # (no ignore_index)
    _fake.check_if_concrete(tensors, _C.check_inputs, *tensors, *check_args)
    acc = _fake.accumulation_dtype(student, teacher)
    grads = ((student, grad_student, student), (teacher, grad_teacher, teacher))
    return _fake.outputs(student, acc, options[6], grads, return_entropy)


@torch.library.register_fake("kdfused::kd_scale_grads_")
def _kd_scale_grads_fake(grad_student, grad_teacher, grad_scale, grad_output):
    return None


def _setup_context(ctx, inputs, output):
    _backward.setup_context(ctx, output, (inputs[12], inputs[13]), results=1)  # (grad flags)


def _backward_kd(ctx, grad_loss, _gs, _gt, _scale, _entropy):
    return _backward.backward(ctx, grad_loss, _N_INPUTS, "kd_loss")


torch.library.register_autograd("kdfused::kd_loss", _backward_kd, setup_context=_setup_context)


# The eager call path (see kd_loss_op): the op's CPU/CUDA kernel called below the autograd key,
# under a torch.autograd.Function of its own.
_kd_loss_kernel = _lib_ops.kd_loss.default._op
_below_autograd = torch._C._AutoDispatchBelowAutograd
_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)
_C_ = torch._C


def _plain_eager(student, teacher, labels) -> bool:
    """Whether a call may skip the op's generic autograd wrapper: eager (not traced by dynamo),
    plain tensors (no subclass: FakeTensor, FunctionalTensor, DTensor, ...), and nothing that
    intercepts the op: no functorch transform (vmap, grad, ...), no torch-function or
    torch-dispatch mode. Everything else takes the registered op's path."""
    return (
        not torch.compiler.is_compiling()
        and type(student) in _PLAIN_TENSORS
        and type(teacher) in _PLAIN_TENSORS
        and (labels is None or type(labels) in _PLAIN_TENSORS)
        and not _C_._are_functorch_transforms_active()
        and not _C_._is_torch_function_mode_enabled()
        and _C_._len_torch_dispatch_stack() == 0
    )


class _KDLossEager(torch.autograd.Function):
    """The registered op's autograd, without the generic wrapper of ``register_autograd`` (which
    goes through Python for the autograd key, redispatches and rebuilds the schema's arguments
    at every call): the same kernel, the same saved state and the same backward."""

    @staticmethod
    def forward(ctx, student, teacher, labels, op_args, return_entropy, need_s, need_t):
        with _below_autograd():
            loss, *grads, entropy = _kd_loss_kernel(
                student, teacher, labels, *op_args, return_entropy, need_s, need_t
            )
        # As _setup_context leaves it (the outputs without gradient get no zeros tensor).
        ctx.set_materialize_grads(False)
        _backward.keep(ctx, (need_s, need_t), tuple(grads))
        return _backward.with_entropy(ctx, loss, entropy if return_entropy else None)

    @staticmethod
    def backward(ctx, grad_loss, *_entropy):
        return _backward.backward(ctx, grad_loss, 7, "kd_loss")


def kd_loss_op(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: Optional[torch.Tensor],
    options: KDOptions,
    return_entropy: bool = False,
):
    """Calls the fused op, asking for the gradients that autograd will need (none under no_grad).
    Returns the loss, or (loss, entropy) with ``return_entropy``.

    Eager calls on plain tensors (:func:`_plain_eager`) call the op's kernel directly, under
    :class:`_KDLossEager` when a gradient is needed: the registered autograd's generic wrapper
    costs more than the whole call at small sizes. Everything else (torch.compile, fake tensors,
    functorch, modes, subclasses) calls the registered op."""
    grad_on = torch.is_grad_enabled()
    need_s = grad_on and student.requires_grad
    need_t = grad_on and teacher.requires_grad
    if _plain_eager(student, teacher, labels):
        if need_s or need_t:
            args = (options.op_args, return_entropy, need_s, need_t)
            return _KDLossEager.apply(student, teacher, labels, *args)
        with _below_autograd():
            out = _kd_loss_kernel(
                student, teacher, labels, *options.op_args, return_entropy, False, False
            )
    else:
        out = _lib_ops.kd_loss(
            student, teacher, labels, *options.op_args, return_entropy, need_s, need_t
        )
    return (out[0], out[4]) if return_entropy else out[0]
