"""Pure-PyTorch reference of :func:`kdfused.topk_kd_loss` (distillation from a stored top-k
teacher).

Same signature and semantics as the fused op, written with ordinary tensor ops so that autograd
supplies the gradient. It imports nothing compiled and materialises several N x V tensors: it is a
readable specification and a test oracle (run it in float64), not fast code.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ._checks import REDUCTIONS, check_logit_transform
from ._checks import TOPK_DIVERGENCES as DIVERGENCES


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
    """Top-k distillation loss, pure PyTorch (see :func:`kdfused.topk_kd_loss` for the contract).

    Per row: p = softmax(teacher_values / T) over the k stored entries, q = softmax(s / T) over
    the whole vocabulary; KL = sum_j p_j (log p_j - log q[idx_j]), CE = -sum_j p_j log q[idx_j];
    row = soft_weight * T^2 * D + hard_weight * cross_entropy(s, y).

    The logit transform of :func:`kdfused.reference.kd_loss` applies to each side first: the
    student's to its logits (both terms), the teacher's to the stored teacher_values, which are
    logits: z = scale * x, then z = softcap * tanh(z / softcap) when a softcap is given; a -inf
    entry stays -inf (no mass). p and q above are then softmax(z / T).
    """
    if divergence not in DIVERGENCES:
        raise ValueError(f"topk_kd_loss supports divergence 'kl' or 'ce', got {divergence!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if teacher_values.requires_grad:
        raise ValueError("teacher_values must not require grad (detach the stored teacher)")
    V = student_logits.shape[-1]
    lead = student_logits.shape[:-1]
    if teacher_indices.shape[:-1] != lead or teacher_indices.dim() != student_logits.dim():
        raise ValueError(
            f"teacher_indices must have shape (..., k) with leading dims "
            f"{tuple(lead)}, got {tuple(teacher_indices.shape)}"
        )
    if teacher_values.shape != teacher_indices.shape:
        raise ValueError(
            f"teacher_values must have shape {tuple(teacher_indices.shape)}, got "
            f"{tuple(teacher_values.shape)}"
        )
    k = teacher_indices.shape[-1]
    if not 1 <= k <= V:
        raise ValueError(f"k must be in [1, V = {V}], got {k}")
    if hard_weight > 0 and labels is None:
        raise ValueError("hard_weight > 0 needs labels")
    check_logit_transform(
        student_logit_scale, teacher_logit_scale, student_softcap, teacher_softcap
    )
    from .reference import logit_transform  # (reference imports this module)

    T = float(temperature)
    acc = (
        torch.float64
        if torch.float64 in (student_logits.dtype, teacher_values.dtype)
        else torch.float32
    )
    s = student_logits.to(acc).reshape(-1, V)
    idx = teacher_indices.reshape(-1, k).long()
    if idx.numel() and (idx.min() < 0 or idx.max() >= V):
        raise ValueError(f"teacher_indices must be in [0, {V})")
    if idx.numel() and (idx.sort(-1).values.diff(dim=-1) == 0).any():
        raise ValueError("teacher_indices must be distinct within a row")
    v = teacher_values.to(acc).reshape(-1, k)
    s = logit_transform(s, student_logit_scale, student_softcap)
    v = logit_transform(v, teacher_logit_scale, teacher_softcap)
    n = s.shape[0]

    row = torch.zeros(n, dtype=acc, device=s.device)
    if soft_weight != 0:
        log_q = F.log_softmax(s / T, dim=-1).gather(1, idx)
        log_p = F.log_softmax(v / T, dim=-1)
        p = log_p.exp()
        # No teacher mass (a -inf value): the term is 0 by definition, and so must be its gradient
        # (where() passes a zero gradient to the unselected branch, whose 0 * -inf would be NaN).
        no_mass = p == 0
        zero = torch.zeros_like(p)
        log_p = torch.where(no_mass, zero, log_p)
        log_q = torch.where(no_mass, zero, log_q)
        if divergence == "kl":
            term = torch.where(no_mass, zero, p * (log_p - log_q))
        else:
            term = torch.where(no_mass, zero, -p * log_q)
        row = row + soft_weight * T * T * term.sum(-1)

    if labels is not None:
        y = labels.reshape(-1).long()
        if y.shape[0] != n:
            raise ValueError(f"labels must have shape {tuple(lead)}, got {tuple(labels.shape)}")
        valid = y != ignore_index
    else:
        y = None
        valid = torch.ones(n, dtype=torch.bool, device=s.device)

    if hard_weight != 0:
        safe_y = torch.where(valid, y, torch.zeros_like(y))
        hard = -F.log_softmax(s, dim=-1).gather(1, safe_y.unsqueeze(1)).squeeze(1)
        row = row + hard_weight * hard

    row = torch.where(valid, row, torch.zeros_like(row))
    if reduction == "none":
        return row.reshape(lead)
    total = row.sum()
    if reduction == "sum":
        return total
    return total / valid.sum().clamp(min=1).to(acc)
