"""Fused linear + chunked distillation loss: :func:`linear_kd_loss` and :class:`LinearKDLoss`.

The loss of :func:`kdfused.kd_loss` on ``F.linear(hidden, weight, bias)`` logits, computed a chunk
of rows at a time by one C++ op (``torch.ops.kdfused.kd_linear_loss``), so that the N x V logits
(and their gradient) never exist. Like ``kd_loss``, the op returns the gradients with the loss; the
backward only scales them (``kd_scale_grads_``, with the same retain_graph / torch.compile / no
double backward behaviour: ``kdfused._backward``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch

from . import _C, _backward, _checks, _fake
from ._module import OptionsModule
from ._options import KDOptions, LossOptions, parse_keywords, takes_options

if TYPE_CHECKING:
    from typing_extensions import Unpack

_N_INPUTS = 22  # arguments of kdfused::kd_linear_loss
_WHO = "kdfused.linear_kd_loss"
_TEACHER_NAMES = ("teacher_hidden", "teacher_weight", "teacher_bias", "teacher_logits")


@torch.library.register_fake("kdfused::kd_linear_loss")
def _kd_linear_loss_fake(sh, sw, sb, th, tw, tb, tl, labels, row_weight, *args):
    # args: the options in the schema's order (KDOptions.op_args), return_entropy, chunk_size,
    # the gradient flags.
    options, return_entropy, (grad_hidden, grad_weight, grad_bias) = args[:8], args[8], args[10:]
    # The options are all the C++ checks exposed alone; the tensors are checked by the kernel.
    _C.check_options(*options[:5], options[6])
    acc = _fake.accumulation_dtype(sh, th if th is not None else tl)
    grads = ((sh, grad_hidden, sh), (sw, grad_weight, sw), (sb, grad_bias, sw))
    return _fake.outputs(sh, acc, options[6], grads, return_entropy)


def _setup_context(ctx, inputs, output):
    none = inputs[15] == "none"
    need = (inputs[19], inputs[20], inputs[21] and inputs[2] is not None)
    _backward.setup_context(ctx, output, need, keep_grads=not none, results=1)
    if none:
        # Reduction "none": grad_weight = sum_r g_r (dlogits_r)^T h_r needs every row's own
        # grad_output g_r, so the backward runs the chunked op again with row_weight = g (no N x V
        # state is kept between forward and backward).
        ctx.save_for_backward(*inputs[:8])
        ctx.kd_args = inputs[9:17] + (False, inputs[18])  # (options, no entropy, chunk_size)
        ctx.kd_recompute = _recompute


def _recompute(ctx, grad_loss):
    out = torch.ops.kdfused.kd_linear_loss(
        *ctx.saved_tensors, grad_loss, *ctx.kd_args, *ctx.kd_need
    )
    return out[1:4]


def _backward_linear(ctx, grad_loss, _gh, _gw, _gb, _scale, _entropy):
    return _backward.backward(ctx, grad_loss, _N_INPUTS, "linear_kd_loss")


torch.library.register_autograd(
    "kdfused::kd_linear_loss", _backward_linear, setup_context=_setup_context
)


def _check_chunk_size(chunk_size) -> int:
    return _checks.check_chunk_size(_WHO, chunk_size)


@takes_options(after="teacher_logits")
def linear_kd_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: Optional[torch.Tensor] = None,
    teacher_weight: Optional[torch.Tensor] = None,
    labels: Optional[torch.Tensor] = None,
    *,
    student_bias: Optional[torch.Tensor] = None,
    teacher_bias: Optional[torch.Tensor] = None,
    teacher_logits: Optional[torch.Tensor] = None,
    return_entropy: bool = False,
    chunk_size: Optional[int] = None,
    process_group=None,
    **options: Unpack[LossOptions],
):
    r"""Distillation loss of the student's (and teacher's) output layer, without N x V logits.

    Equals ``kdfused.kd_loss(F.linear(student_hidden, student_weight, student_bias), teacher,
    labels, ...)`` with the same options, where ``teacher`` is ``F.linear(teacher_hidden,
    teacher_weight, teacher_bias)`` or ``teacher_logits``. The rows are processed ``chunk_size``
    at a time: per chunk the logits (chunk x V) come from one GEMM each, the fused kd_loss kernel
    gives the row losses and the logit gradient, and two more GEMMs fold that gradient into the
    gradients of ``student_hidden`` and ``student_weight`` (and a column sum into
    ``student_bias``). Extra memory is O(chunk x V) plus the gradients themselves.

    Args:
        student_hidden: ``(..., H)``; student_weight ``(V, H)``; student_bias ``(V,)`` or None; one
            float dtype (float16, bfloat16, float32, float64). Each gets a gradient when it
            requires grad.
        teacher_hidden, teacher_weight, teacher_bias: the teacher's layer: ``(..., H_t)`` with the
            student's leading dims, ``(V, H_t)``, ``(V,)``; ``H_t`` may differ from ``H``. Or
        teacher_logits: ``(..., V)``. Exactly one of the two forms; the teacher gets no gradient
            (a teacher tensor that requires grad raises ValueError: detach it, or use
            :func:`kdfused.kd_loss` on materialised logits for mutual distillation).
        labels, temperature, soft_weight, hard_weight, divergence, beta, ignore_index, reduction,
            student_logit_scale, teacher_logit_scale, student_softcap, teacher_softcap,
            return_entropy: as for :func:`kdfused.kd_loss`; the student's transform applies to
            ``student_hidden @ student_weight.T + student_bias``, the teacher's to its logits
            (computed or given), inside the kernel of each chunk.
        chunk_size: rows per chunk, > 0; ``None`` picks as many rows as make one chunk's student
            logits about 64 MiB (``64 MiB // (V * element size)``) but at most ``ceil(N / 8)``
            (rounded up to a multiple of 16, at least 64), rounded down to a multiple of 16 when
            >= 64 (N = 4096, V = 32000 float32: 512 rows). The extra memory is about 3-4 such
            buffers: at most about half of what the N x V logits would take, at every size.
        process_group: ``None``, or a ``torch.distributed`` process group over which the vocabulary
            is split (CPU tensors with gloo; CUDA with nccl, not run on a GPU yet):
            ``student_weight`` / ``student_bias`` (and ``teacher_weight`` / ``teacher_bias``, or the
            last dim of ``teacher_logits``) hold this process's contiguous slice of the vocabulary,
            slices in rank order, of any widths; hidden states and labels (global indices) are the
            same on every process. The loss is the whole loss, bitwise identical on every process;
            the weight and bias gradients are this process's slices; the ``student_hidden`` gradient
            is the *whole* one (the slices' parts summed over the group in rank order, identical on
            every process) -- with a Megatron-style column-parallel lm-head whose backward all-
            reduces the input gradient itself, divide it by the group size or feed the head's local
            output instead. Communication: one ``all_gather`` of 8 int64 per process (consistency
            checks), per chunk one of 10 floats per row (two more for jsd / tvd: 3 floats), and one
            of the N x H hidden gradient parts; ``chunk_size=None`` picks the chunk from the whole
            vocabulary, so every process chunks alike. Under ``torch.compile`` the call is a graph
            break. Reduction ``"none"`` runs the collectives again in backward.

    Returns:
        The loss, as :func:`kdfused.kd_loss` returns it (float32, or float64 for float64 inputs);
        with ``return_entropy=True``, ``(loss, entropy)`` as :func:`kdfused.kd_loss` returns them.

    The gradients are computed in the forward call; ``loss.backward()`` then only scales them by
    grad_output (nothing at all when it is 1). For ``reduction="none"`` no gradient is kept: the
    backward runs the chunked computation again with each row's grad_output. Chunks whose rows are
    all ignored skip their GEMMs. The loss does not depend on the chunk size (rows are reduced in
    a fixed order, in double); the gradients of ``student_weight`` and ``student_bias`` are sums
    over chunks and so may differ across chunk sizes by floating-point summation order (for
    16-bit weights they are accumulated in float32 and rounded once). For a fixed chunk size the
    results are deterministic (every reduction has a fixed order; the tests check bitwise equality
    across runs and across 1 and 2 threads, which relies on the BLAS being deterministic too).
    Double backward raises RuntimeError.

    Devices: CPU and CUDA, the same chunk loop on both. On the CPU the GEMMs are MKL / oneDNN,
    label values are checked before any GEMM (ValueError) and chunks whose rows are all ignored
    skip their GEMMs. On CUDA the GEMMs are cuBLAS and the kernel the fused CUDA kd_loss kernel, on
    the current stream, with no host sync: the valid rows are counted on the device, every chunk
    runs its GEMMs, and a label out of range stops the kernel with a device-side assert (as
    :func:`kdfused.kd_loss` does on CUDA).
    """
    tensors = (student_hidden, student_weight, teacher_hidden, teacher_weight, labels)
    tensors += (student_bias, teacher_bias, teacher_logits)
    _check_tensor_types(*tensors)
    # With a process group the option values are checked with the tensors, inside the exchange
    # (a bad value on one process must not leave the others blocked in a collective).
    parsed = parse_keywords("linear_kd_loss", options, who=_WHO, check_values=process_group is None)
    _checks.check_flag("return_entropy", return_entropy)
    chunk = _check_chunk_size(chunk_size)
    return _dispatch(*tensors, parsed, chunk, process_group, return_entropy)


def _check_tensor_types(sh, sw, th, tw, labels, sb, tb, tl) -> None:
    required = (("student_hidden", sh), ("student_weight", sw))
    optional = (("teacher_hidden", th), ("teacher_weight", tw), ("labels", labels))
    optional += (("student_bias", sb), ("teacher_bias", tb), ("teacher_logits", tl))
    _checks.check_tensor_types(_WHO, required, optional)


def _dispatch(
    sh, sw, th, tw, labels, sb, tb, tl, options: KDOptions, chunk: int, group, entropy=False
):
    if group is not None:
        from .parallel_linear import vocab_parallel_linear_kd_loss

        return vocab_parallel_linear_kd_loss(
            sh, sw, th, tw, labels, sb, tb, tl, group, options, chunk, entropy
        )
    grad_on = torch.is_grad_enabled()
    if grad_on:
        for name, t in zip(_TEACHER_NAMES, (th, tw, tb, tl)):
            if t is not None and t.requires_grad:
                raise ValueError(
                    f"{_WHO}: {name} requires grad, but the teacher gets no "
                    f"gradient here; pass {name}.detach() (for mutual distillation use "
                    f"kdfused.kd_loss on materialised logits)"
                )
    need_h = grad_on and sh.requires_grad
    need_w = grad_on and sw.requires_grad
    need_b = grad_on and sb is not None and sb.requires_grad
    args = (*options.op_args, entropy, chunk, need_h, need_w, need_b)
    out = torch.ops.kdfused.kd_linear_loss(sh, sw, sb, th, tw, tb, tl, labels, None, *args)
    return (out[0], out[5]) if entropy else out[0]


class LinearKDLoss(OptionsModule):
    """Module form of :func:`linear_kd_loss`; the keywords are checked when the module is built.

    Example::

        >>> crit = LinearKDLoss(temperature=2.0, soft_weight=0.5, hard_weight=0.5)
        >>> loss = crit(h_student, lm_head.weight, h_teacher.detach(), teacher_head.weight, labels)
    """

    _who = _WHO

    _function = linear_kd_loss
    _extra = ("chunk_size", "process_group")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        _check_chunk_size(self.chunk_size)

    def forward(
        self,
        student_hidden: torch.Tensor,
        student_weight: torch.Tensor,
        teacher_hidden: Optional[torch.Tensor] = None,
        teacher_weight: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        *,
        student_bias: Optional[torch.Tensor] = None,
        teacher_bias: Optional[torch.Tensor] = None,
        teacher_logits: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        tensors = (student_hidden, student_weight, teacher_hidden, teacher_weight, labels)
        tensors += (student_bias, teacher_bias, teacher_logits)
        _check_tensor_types(*tensors)
        chunk = _check_chunk_size(self.chunk_size)
        return _dispatch(*tensors, self.options, chunk, self.process_group)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, chunk_size={self.chunk_size}"
