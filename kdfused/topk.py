"""Offline distillation from a stored top-k teacher: :func:`topk_kd_loss`, :class:`TopKKDLoss`
and :func:`topk_teacher`, with the fake kernel and the autograd registration of the op
``torch.ops.kdfused.topk_kd_loss``.

The op returns the loss *and* the gradient of the reduced loss w.r.t. the student for
grad_output = 1; the backward only rescales it, with the same ``kd_scale_grads_`` op that
:func:`kdfused.kd_loss` uses (in place, nothing moves when grad_output == 1).
"""

from __future__ import annotations

from typing import Optional

import torch

from . import (
    _C,  # noqa: F401  (loads the library that defines torch.ops.kdfused)
    _backward,
    _checks,
    _fake,
)
from ._checks import FLOAT_DTYPES as _FLOATS
from ._checks import TOPK_DIVERGENCES
from ._module import OptionsModule
from ._options import parse

_N_INPUTS = 12


def _check_meta(
    student, indices, values, labels, temperature, soft_weight, hard_weight, divergence, reduction
):
    """The op's checks that need no data, for fake tensors (the C++ op runs the same checks,
    csrc/kd_topk.cpp, which no Python entry point exposes)."""
    # beta is jsd's, which top-k does not support: the neutral default.
    options = (temperature, soft_weight, hard_weight, divergence, 0.5, reduction)
    _checks.check_options(*options, TOPK_DIVERGENCES)
    if student.dtype not in _FLOATS:
        raise TypeError(
            f"kdfused: student_logits must be float16, bfloat16, float32 or float64, "
            f"got {student.dtype}"
        )
    if indices.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"kdfused: teacher_indices must be int64 or int32, got {indices.dtype}")
    if values.dtype not in _FLOATS:
        raise TypeError(
            f"kdfused: teacher_values must be float16, bfloat16, float32 or float64, "
            f"got {values.dtype}"
        )
    if student.dim() < 1 or student.shape[-1] < 1:
        raise ValueError("kdfused: student_logits must be (..., V) with V >= 1")
    lead = tuple(student.shape[:-1])
    if indices.dim() != student.dim() or tuple(indices.shape[:-1]) != lead:
        raise ValueError(
            f"kdfused: teacher_indices must have shape (..., k) with the student's "
            f"leading dims {lead}, got {tuple(indices.shape)}"
        )
    if values.shape != indices.shape:
        raise ValueError(
            f"kdfused: teacher_values must have the shape of teacher_indices "
            f"{tuple(indices.shape)}, got {tuple(values.shape)}"
        )
    k, V = indices.shape[-1], student.shape[-1]
    if k < 1:
        raise ValueError("kdfused: k (the last dim of teacher_indices) must be >= 1, got 0")
    if k > V:
        raise ValueError(
            f"kdfused: k = {k} teacher entries per row but the vocabulary has only V = {V}"
        )
    if labels is not None:
        if labels.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"kdfused: labels must be int64 (or int32), got {labels.dtype}")
        if tuple(labels.shape) != lead:
            raise ValueError(f"kdfused: labels must have shape {lead}, got {tuple(labels.shape)}")
    elif hard_weight != 0:
        raise ValueError("kdfused: hard_weight > 0 needs labels (got labels=None)")


@torch.library.register_fake("kdfused::topk_kd_loss")
def _topk_kd_loss_fake(student, indices, values, labels, *args):
    # args: the options in the schema's order (KDOptions.topk_args), then the gradient flag.
    temperature, soft_weight, hard_weight, divergence, _, reduction, _, grad_student = args
    tensors = (student, indices, values, labels)
    options = (temperature, soft_weight, hard_weight, divergence, reduction)
    _fake.check_if_concrete(tensors, _check_meta, *tensors, *options)
    acc = _fake.accumulation_dtype(student, values)
    return _fake.outputs(student, acc, reduction, ((student, grad_student, student),))


def _setup_context(ctx, inputs, output):
    if inputs[2].requires_grad:
        raise ValueError(
            "kdfused: teacher_values must not require grad: topk_kd_loss gives no "
            "teacher gradient (detach the stored teacher)"
        )
    _backward.setup_context(ctx, output, (inputs[11],))


def _backward_topk(ctx, grad_loss, _gs, _scale):
    return _backward.backward(ctx, grad_loss, _N_INPUTS, "topk_kd_loss")


torch.library.register_autograd(
    "kdfused::topk_kd_loss", _backward_topk, setup_context=_setup_context
)


def topk_kd_loss(
    student_logits: torch.Tensor,
    teacher_indices: torch.Tensor,
    teacher_values: torch.Tensor,
    labels: Optional[torch.Tensor] = None,
    *,
    temperature: float = 1.0,
    soft_weight: float = 1.0,
    hard_weight: float = 0.0,
    divergence: str = "kl",
    ignore_index: int = -100,
    reduction: str = "batchmean",
    student_logit_scale: float = 1.0,
    teacher_logit_scale: float = 1.0,
    student_softcap: Optional[float] = None,
    teacher_softcap: Optional[float] = None,
) -> torch.Tensor:
    r"""Distillation loss against a stored top-k teacher, fused (offline distillation).

    Per row :math:`r` of the flattened leading dimensions, with :math:`T` the temperature, the
    teacher distribution is renormalised over its :math:`k` stored entries,
    :math:`p = \mathrm{softmax}(v_r / T)` (``v`` = ``teacher_values``), and the student's is over
    the whole vocabulary, :math:`q = \mathrm{softmax}(s_r / T)`:

    .. math::
        \mathrm{KL} = \sum_j p_j (\log p_j - \log q_{i_j}), \qquad
        \mathrm{CE} = -\sum_j p_j \log q_{i_j}, \qquad
        \ell_r = w_s T^2 D + w_h \, \mathrm{CE}(s_r, y_r)

    with :math:`i_j` the ``teacher_indices``; the hard term is the ordinary cross-entropy at
    :math:`T = 1` over the full student row. A term whose weight is exactly 0 is not computed.
    With :math:`k = V` (all entries, any order) this is :func:`kdfused.kd_loss`.

    Args:
        student_logits: ``(..., V)`` float16/bfloat16/float32/float64.
        teacher_indices: ``(..., k)`` int64 or int32, ``1 <= k <= V``, in ``[0, V)`` and distinct
            within a row (e.g. from :func:`topk_teacher`).
        teacher_values: ``(..., k)`` any float dtype: the teacher's logits at those indices.
            ``-inf`` marks an entry without mass (it contributes nothing, never NaN; a row whose
            k values are all ``-inf`` has no distribution and gives NaN, like softmax). Must not
            require grad (``ValueError``): no teacher gradient is computed.
        labels: ``(...)`` int64/int32 class indices or ``None`` (needed when ``hard_weight > 0``).
            Rows whose label equals ``ignore_index`` give 0 loss and 0 gradient.
        temperature, soft_weight, hard_weight, divergence (``"kl"`` or ``"ce"``), ignore_index,
            reduction (``"batchmean"``/``"mean"``: sum over valid rows / their number,
            ``"sum"``, ``"none"``): as in :func:`kdfused.kd_loss`.
        student_logit_scale, student_softcap: the student's logit transform, as in
            :func:`kdfused.kd_loss` (in the kernel, on every student logit).
        teacher_logit_scale, teacher_softcap: the teacher's, applied to the stored
            ``teacher_values`` (raw logits), so a teacher stored before its transform gets it here.

    Returns:
        The loss: float32, or float64 if ``student_logits`` or ``teacher_values`` is float64
        (also the accumulation type).

    The gradient w.r.t. ``student_logits`` is computed in the forward call when it requires grad
    (dense: :math:`w_s T (q - \tilde p) + w_h(\mathrm{softmax}(s) - \mathrm{onehot}(y))`, with
    :math:`\tilde p` the teacher distribution scattered to its indices); ``loss.backward()`` then
    costs no pass over the logits. Results are bitwise deterministic.

    Bad input raises ``ValueError``/``TypeError`` before anything is computed. On the CPU that
    includes index values (out of range, duplicates in a row) and labels. On CUDA, checking
    values on the host would need a device-to-host sync, so the kernel checks them: an index out of
    range, a duplicate index in a row (found with a shared-memory bitmap of the row's vocabulary
    when ``V <= 393216``, not checked above that) or a label out of range stops the kernel with a
    device-side assert, like PyTorch's own indexing and cross-entropy kernels. (The indices are
    only read, and so only checked, when ``soft_weight > 0``.)
    """
    _check_tensor_types(student_logits, teacher_indices, teacher_values, labels)
    # beta is jsd's, which top-k does not support: the neutral default.
    options = (temperature, soft_weight, hard_weight, divergence, 0.5, ignore_index, reduction)
    options += (student_logit_scale, teacher_logit_scale, student_softcap, teacher_softcap)
    options = parse(*options, divergences=TOPK_DIVERGENCES)
    return _call(student_logits, teacher_indices, teacher_values, labels, options)


def _check_tensor_types(student_logits, teacher_indices, teacher_values, labels) -> None:
    required = (("student_logits", student_logits), ("teacher_indices", teacher_indices))
    required += (("teacher_values", teacher_values),)
    _checks.check_tensor_types("kdfused", required, (("labels", labels),))


def _call(student_logits, teacher_indices, teacher_values, labels, options):
    if teacher_values.requires_grad:
        raise ValueError(
            "kdfused: teacher_values must not require grad: topk_kd_loss gives no "
            "teacher gradient (detach the stored teacher)"
        )
    need = torch.is_grad_enabled() and student_logits.requires_grad
    return torch.ops.kdfused.topk_kd_loss(
        student_logits, teacher_indices, teacher_values, labels, *options.topk_args, need
    )[0]


class TopKKDLoss(OptionsModule):
    """Module form of :func:`topk_kd_loss`; the keywords are checked when the module is built.

    Example::

        >>> crit = TopKKDLoss(temperature=2.0, soft_weight=0.9, hard_weight=0.1)
        >>> loss = crit(student_logits, stored_indices, stored_values, labels)
    """

    _function = topk_kd_loss
    _divergences = TOPK_DIVERGENCES

    def forward(
        self,
        student_logits: torch.Tensor,
        teacher_indices: torch.Tensor,
        teacher_values: torch.Tensor,
        labels: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        _check_tensor_types(student_logits, teacher_indices, teacher_values, labels)
        return _call(student_logits, teacher_indices, teacher_values, labels, self.options)


@torch.no_grad()
def topk_teacher(
    teacher_logits: torch.Tensor, k: int, rows_per_chunk: Optional[int] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's ``k`` largest logits per row and their indices, to store for
    :func:`topk_kd_loss`: returns ``(indices, values)``, both ``(..., k)``, indices int64 (store
    them as int32 to halve the file when ``V < 2**31``), values in the logits' dtype, each row in
    descending order of value.

    Works in chunks of the first dimension (about ``rows_per_chunk`` rows each, default: 64 MiB of
    logits), in the logits' dtype: a non-contiguous input is never copied whole and no N x V
    float32 copy of a 16-bit input is made.
    """
    if not isinstance(teacher_logits, torch.Tensor):
        raise TypeError(
            f"kdfused: teacher_logits must be a tensor, got {type(teacher_logits).__name__}"
        )
    if teacher_logits.dtype not in _FLOATS:
        raise TypeError(
            f"kdfused: teacher_logits must be float16, bfloat16, float32 or float64, "
            f"got {teacher_logits.dtype}"
        )
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"kdfused: k must be an int, got {type(k).__name__}")
    if teacher_logits.dim() < 1:
        raise ValueError("kdfused: teacher_logits must be (..., V)")
    V = teacher_logits.shape[-1]
    if not 1 <= k <= V:
        raise ValueError(f"kdfused: k must be in [1, V = {V}], got {k}")
    if teacher_logits.dim() == 1:
        val, idx = torch.topk(teacher_logits, k, dim=-1, largest=True, sorted=True)
        return idx, val
    # Chunks of the first dim (topk reads any strides; a chunk that needs a copy is copied alone).
    inner = teacher_logits[0].numel() if teacher_logits.shape[0] else 1
    if rows_per_chunk is None:
        rows_per_chunk = max(1, (64 << 20) // max(1, V * teacher_logits.element_size()))
    step = max(1, rows_per_chunk // max(1, inner // V))
    out_shape = teacher_logits.shape[:-1] + (k,)
    idx = torch.empty(out_shape, dtype=torch.int64, device=teacher_logits.device)
    val = torch.empty(out_shape, dtype=teacher_logits.dtype, device=teacher_logits.device)
    for a in range(0, teacher_logits.shape[0], step):
        b = min(teacher_logits.shape[0], a + step)
        torch.topk(
            teacher_logits[a:b], k, dim=-1, largest=True, sorted=True, out=(val[a:b], idx[a:b])
        )
    return idx, val
