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


def kd_loss_op(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: Optional[torch.Tensor],
    options: KDOptions,
    return_entropy: bool = False,
):
    """Calls the fused op, asking for the gradients that autograd will need (none under no_grad).
    Returns the loss, or (loss, entropy) with ``return_entropy``."""
    grad_on = torch.is_grad_enabled()
    need_s = grad_on and student.requires_grad
    need_t = grad_on and teacher.requires_grad
    out = _lib_ops.kd_loss(
        student, teacher, labels, *options.op_args, return_entropy, need_s, need_t
    )
    return (out[0], out[4]) if return_entropy else out[0]
