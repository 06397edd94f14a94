"""Public API: :func:`kd_loss` and the :class:`KDLoss` module."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from . import _C
from ._ops import kd_loss_op


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: Optional[torch.Tensor] = None,
    *,
    temperature: float = 1.0,
    soft_weight: float = 1.0,
    hard_weight: float = 0.0,
    divergence: str = "kl",
    beta: float = 0.5,
    ignore_index: int = -100,
    reduction: str = "batchmean",
) -> torch.Tensor:
    r"""Knowledge-distillation loss (Hinton, Vinyals & Dean 2015), fused.

    Per row :math:`r` of the flattened leading dimensions, with :math:`T` the temperature,
    :math:`p = \mathrm{softmax}(t_r / T)` and :math:`q = \mathrm{softmax}(s_r / T)`:

    .. math::
        \ell_r = w_s T^2 D(p \,\|\, q) + w_h \, \mathrm{CE}(s_r, y_r)

    where :math:`D` is :math:`\mathrm{KL}(p\|q)` (``divergence="kl"``) or the soft-target
    cross-entropy :math:`-\sum p \log q` (``"ce"``), and the hard term is the ordinary cross-entropy
    at :math:`T = 1`. A term whose weight is exactly 0 is not computed at all.

    Args:
        student_logits: ``(..., V)`` float16/bfloat16/float32/float64. Row-strided views (e.g.
            ``logits[:, :-1]``) are read in place; a non-contiguous last dim is copied.
        teacher_logits: same shape and device; may have another float dtype. Gets a gradient (from
            the same kernel) when it requires grad, e.g. for online/mutual distillation.
        labels: ``(...)`` int64 (or int32) class indices, or ``None``. Needed when
            ``hard_weight > 0``. Rows whose label equals ``ignore_index`` contribute 0 to the loss
            and to every gradient.
        temperature: :math:`T > 0`, finite.
        soft_weight, hard_weight: :math:`w_s, w_h \ge 0`, finite.
        divergence: ``"kl"`` or ``"ce"``.
        ignore_index: label value marking rows to ignore.
        reduction: ``"batchmean"`` or ``"mean"`` (sum over valid rows / number of valid rows, 0.0
            when there is none; note that ``"mean"`` is per *row*, unlike ``F.kl_div``'s per-element
            mean), ``"sum"``, or ``"none"`` (shape ``student_logits.shape[:-1]``, 0 at ignored rows).

    Returns:
        The loss: float32 for 16/32-bit inputs, float64 if either input is float64.

    Masked vocabulary: a ``-inf`` teacher logit has probability 0 and contributes nothing (never
    NaN); a ``-inf`` student logit where the teacher has mass makes the loss ``+inf``; a row that is
    ``-inf`` everywhere has no distribution and gives NaN, like ``torch.softmax``.

    The gradients are computed in the forward call (one fused pass) when an input requires grad;
    ``loss.backward()`` then costs no pass over the logits. Under ``torch.no_grad()`` only the loss
    is computed. Results are bitwise deterministic. With ``retain_graph=True`` each backward costs
    one pass (a scaled copy of the saved gradient) and may be repeated with any ``grad_output``.
    For float16/bfloat16 inputs and ``grad_output != 1`` the gradient is rounded twice (once in the
    forward, once when scaled), i.e. within one ulp more than a single rounding.
    Double backward (``create_graph=True``) is not supported and raises ``RuntimeError``.

    Example::

        >>> s = torch.randn(8, 100, requires_grad=True); t = torch.randn(8, 100)
        >>> y = torch.randint(0, 100, (8,))
        >>> loss = kd_loss(s, t, y, temperature=4.0, soft_weight=0.9, hard_weight=0.1)
        >>> loss.backward()
    """
    if not isinstance(student_logits, torch.Tensor) or not isinstance(teacher_logits, torch.Tensor):
        raise TypeError("kdfused: student_logits and teacher_logits must be tensors")
    if labels is not None and not isinstance(labels, torch.Tensor):
        raise TypeError(f"kdfused: labels must be a tensor or None, got {type(labels).__name__}")
    for name, value in (("temperature", temperature), ("soft_weight", soft_weight),
                        ("hard_weight", hard_weight), ("beta", beta)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"kdfused: {name} must be a real number, got {type(value).__name__}")
    if not isinstance(divergence, str) or not isinstance(reduction, str):
        raise TypeError("kdfused: divergence and reduction must be strings")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"kdfused: ignore_index must be an int, got {type(ignore_index).__name__}")
    return kd_loss_op(student_logits, teacher_logits, labels, temperature, soft_weight,
                      hard_weight, divergence, beta, ignore_index, reduction)


class KDLoss(nn.Module):
    """Module form of :func:`kd_loss`; the keywords are checked when the module is built.

    Example::

        >>> crit = KDLoss(temperature=4.0, soft_weight=0.9, hard_weight=0.1)
        >>> loss = crit(student_logits, teacher_logits.detach(), labels)
    """

    def __init__(self, temperature: float = 1.0, soft_weight: float = 1.0, hard_weight: float = 0.0,
                 divergence: str = "kl", beta: float = 0.5, ignore_index: int = -100,
                 reduction: str = "batchmean"):
        super().__init__()
        _C.check_options(float(temperature), float(soft_weight), float(hard_weight), divergence,
                         float(beta), reduction)
        self.beta = float(beta)
        self.temperature = float(temperature)
        self.soft_weight = float(soft_weight)
        self.hard_weight = float(hard_weight)
        self.divergence = divergence
        self.ignore_index = int(ignore_index)
        self.reduction = reduction

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        return kd_loss(student_logits, teacher_logits, labels, temperature=self.temperature,
                       soft_weight=self.soft_weight, hard_weight=self.hard_weight,
                       divergence=self.divergence, beta=self.beta, ignore_index=self.ignore_index,
                       reduction=self.reduction)

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, soft_weight={self.soft_weight}, "
                f"hard_weight={self.hard_weight}, divergence={self.divergence!r}, beta={self.beta}, "
                f"ignore_index={self.ignore_index}, reduction={self.reduction!r}")
