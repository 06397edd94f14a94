"""Pure-PyTorch reference implementation of :func:`kdfused.kd_loss`.

Same signature and semantics as the fused op, written with ordinary tensor ops so that autograd
supplies the gradients. It materialises several N x V tensors and is meant for testing and as a
readable specification, not for speed. Accumulation is float32 for 16/32-bit inputs and float64
when either input is float64.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

DIVERGENCES = ("kl", "ce")
REDUCTIONS = ("batchmean", "mean", "sum", "none")


def _acc_dtype(*tensors: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(x.dtype == torch.float64 for x in tensors) else torch.float32


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: Optional[torch.Tensor] = None,
    *,
    temperature: float = 1.0,
    soft_weight: float = 1.0,
    hard_weight: float = 0.0,
    divergence: str = "kl",
    ignore_index: int = -100,
    reduction: str = "batchmean",
) -> torch.Tensor:
    """Knowledge-distillation loss, pure PyTorch (see :func:`kdfused.kd_loss` for the contract)."""
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student and teacher logits must have the same shape, got "
            f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}"
        )
    if hard_weight > 0 and labels is None:
        raise ValueError("hard_weight > 0 needs labels")

    T = float(temperature)
    acc = _acc_dtype(student_logits, teacher_logits)
    lead = student_logits.shape[:-1]
    V = student_logits.shape[-1]
    s = student_logits.to(acc).reshape(-1, V)
    t = teacher_logits.to(acc).reshape(-1, V)
    n = s.shape[0]

    row = torch.zeros(n, dtype=acc, device=s.device)
    if soft_weight != 0:
        log_q = F.log_softmax(s / T, dim=-1)
        log_p = F.log_softmax(t / T, dim=-1)
        p = log_p.exp()
        # Where the teacher has no mass (p == 0, e.g. a masked -inf logit) the term is 0 by
        # definition; computing it would give 0 * (-inf) = NaN, hence the where(). A NaN p (a
        # teacher row that is -inf everywhere has no distribution) stays NaN.
        # The logs are replaced where there is no mass too: where() passes a zero gradient to the
        # branch it did not select, and 0 * (-inf) in that branch's backward would still be NaN.
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
        y = labels.reshape(-1)
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
    n_valid = valid.sum().clamp(min=1).to(acc)
    return total / n_valid
