"""Pure-PyTorch reference of :func:`kdfused.topk_kd_loss` (distillation from a stored top-k
teacher).

Same signature, checks and semantics as the fused op, written with ordinary tensor ops so that
autograd supplies the gradient. It imports nothing compiled and materialises several N x V
tensors: it is a readable specification and a test oracle (run it in float64), not fast code.

Per row, with T the temperature, z the student's logits after its transform, i_j the stored
indices and v_j the stored values. Entry j is *valid* iff v_j != -inf (a NaN is valid: it
poisons the row); the others are padding, outside the support on both sides, and their index may
be anything in [0, V), a duplicate included. The valid entries' indices are distinct.

Teacher log-probabilities lp_j, over the valid j:

    values="logits"    lp = log_softmax(v / T) over the valid entries (after the teacher transform)
    values="logprobs"  support "full" / "renormalized": lp = v - logsumexp_valid(v) (no T)
                       support "tail": lp = v as stored, and a tail bucket
                       lp_t = log(1 - exp(min(logsumexp_valid(v), -1e-7)))

Student log-probabilities lq_j:

    "full"          lq = log_softmax(z / T) over the whole vocabulary, at i_j
    "renormalized"  lq = log_softmax(z[i] / T) over the valid entries
    "tail"          lq = log_softmax(z / T)[i_j], and lq_t as lp_t from the lq_j

D sums over the buckets (the valid entries, plus the tail bucket) the divergence's terms, as
:func:`kdfused.reference.divergence_rows` (kl, ce, reverse_kl, jsd with beta, tvd; beta 0 and 1
are the two KLs); then row = soft_weight * T^2 * D + hard_weight * CE(z at T = 1, y). A row with
no valid entry has D = 0 (only its hard term, and no soft gradient); ignored rows give 0.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Optional

import torch
import torch.nn.functional as F

from . import _checks
from ._options import (
    TOPK_OPTION_DEFAULTS,
    TOPK_PARAMETERS,
    TopKLossOptions,
    option_values,
    parse,
    takes_options,
)

if TYPE_CHECKING:
    from typing_extensions import Unpack
from .reference import _tempered_log_softmax, divergence_rows, logit_transform

# The tail bucket's clamp: the stored entries hold at most 1 - 1e-7 of the mass (TRL's
# _add_tail_bucket), so that log(1 - sum) stays finite.
TAIL_CLAMP = -1e-7


@takes_options(TOPK_PARAMETERS)
def topk_kd_loss(
    student_logits: torch.Tensor,
    teacher_indices: torch.Tensor,
    teacher_values: torch.Tensor,
    labels: Optional[torch.Tensor] = None,
    **options: Unpack[TopKLossOptions],
) -> torch.Tensor:
    """Top-k distillation loss, pure PyTorch (see :func:`kdfused.topk_kd_loss` for the contract
    and this module's docstring for the formulas)."""
    tensors = (student_logits, teacher_indices, teacher_values, labels)
    given = option_values("topk_kd_loss", options, TOPK_OPTION_DEFAULTS)
    options, support, values = _check(*tensors, *given)
    ignore_index = options.ignore_index
    T, ws, wh = options.temperature, options.soft_weight, options.hard_weight
    V, k = student_logits.shape[-1], teacher_indices.shape[-1]
    lead = student_logits.shape[:-1]
    acc = torch.float64 if torch.float64 in (student_logits.dtype, teacher_values.dtype) else None
    acc = acc or torch.float32
    idx = teacher_indices.reshape(-1, k).long()
    raw = teacher_values.reshape(-1, k)
    valid = raw != -math.inf  # before any transform: padding is -inf as stored
    n = idx.shape[0]

    y = None if labels is None else labels.reshape(-1).long()
    rows = torch.ones(n, dtype=torch.bool) if y is None else y != ignore_index
    rows = rows.to(student_logits.device)
    # Ignored rows are replaced by zeros: whatever they hold reaches neither the loss nor the
    # gradient (where() gives them a zero gradient).
    s = torch.where(rows.unsqueeze(1), student_logits.to(acc).reshape(-1, V), 0.0)
    v = torch.where(rows.unsqueeze(1) & valid, raw.to(acc), -math.inf)
    valid = valid & rows.unsqueeze(1)
    s = logit_transform(s, options.student_logit_scale, options.student_softcap)

    row = torch.zeros(n, dtype=acc, device=s.device)
    if ws != 0:
        if values == "logits":
            v = logit_transform(v, options.teacher_logit_scale, options.teacher_softcap)
        lp, lq, mask = _buckets(s, idx, v, valid, T, support, values)
        lp, lq = _outside(mask, lp), _outside(mask, lq)
        D = divergence_rows(lp, lq, options.divergence, options.beta)
        # No valid entry: no teacher distribution, nothing to compare (never NaN).
        row = row + ws * T * T * torch.where(valid.any(-1), D, 0.0)
    if wh != 0:
        safe_y = torch.where(rows, y, 0)
        hard = -F.log_softmax(s, dim=-1).gather(1, safe_y.unsqueeze(1)).squeeze(1)
        row = row + wh * hard
    row = torch.where(rows, row, 0.0)
    return _reduce(row, rows, options.reduction, lead, acc)


def _check(student, indices, values_t, labels, *options):
    """The op's checks, in its order: the tensors' types, the options, the shapes, then the
    values the CPU op reads (labels, indices)."""
    temperature, soft_weight, hard_weight, divergence, beta, support, values = options[:7]
    ignore_index, reduction, *transform = options[7:]
    required = (("student_logits", student), ("teacher_indices", indices))
    required += (("teacher_values", values_t),)
    _checks.check_tensor_types("kdfused", required, (("labels", labels),))
    _checks.check_topk_option_types(support, values)
    parsed = parse(
        temperature, soft_weight, hard_weight, divergence, beta, ignore_index, reduction,
        *transform,
    )  # fmt: skip
    teacher_transformed = parsed.teacher_logit_scale != 1.0 or parsed.teacher_softcap is not None
    _checks.check_topk_options(divergence, support, values, teacher_transformed)
    if values_t.requires_grad:
        raise ValueError(
            "kdfused: teacher_values must not require grad: topk_kd_loss gives no "
            "teacher gradient (detach the stored teacher)"
        )
    _checks.check_topk_inputs(student, indices, values_t, labels, parsed.hard_weight)
    V = student.shape[-1]
    _checks.check_label_values(labels, V, ignore_index)
    _checks.check_topk_indices(indices, values_t != -math.inf, V)
    return parsed, support, values


def _buckets(s, idx, v, valid, T, support, values):
    """(lp, lq, mask): the teacher's and the student's log-probabilities per bucket, and which
    buckets are in the support (the k entries, then the tail bucket for "tail")."""
    if values == "logits":
        lp = _log_softmax_over(v / T, valid)
    elif support == "tail":
        lp = v
    else:
        lp = _log_softmax_over(v, valid)
    if support == "renormalized":
        lq = _log_softmax_over(s.gather(1, idx) / T, valid)
    else:
        lq = _tempered_log_softmax(s, T).gather(1, idx)
    if support != "tail":
        return lp, lq, valid
    lp = torch.cat([lp, _tail(lp, valid)], dim=-1)
    lq = torch.cat([lq, _tail(lq, valid)], dim=-1)
    return lp, lq, torch.cat([valid, torch.ones_like(valid[:, :1])], dim=-1)


def _outside(mask, x):
    """-inf outside the support: no mass on either side, a term of 0 (where(): no gradient)."""
    return torch.where(mask, x, -math.inf)


def _logsumexp_over(x, valid):
    """logsumexp of each row's valid entries; -inf for a row with none, with a zero gradient
    (a logsumexp of -inf only would send NaN back: such rows take a stand-in row of zeros)."""
    has = valid.any(-1, keepdim=True)
    x = torch.where(valid, x, -math.inf)
    x = torch.where(has, x, 0.0)
    return torch.where(has, torch.logsumexp(x, dim=-1, keepdim=True), -math.inf)


def _log_softmax_over(x, valid):
    """log_softmax of x over each row's valid entries (the others: anything, masked later)."""
    return torch.where(valid, x - _logsumexp_over(x, valid), 0.0)


def _tail(lp, valid):
    """log(1 - sum of the valid entries' probabilities), the sum clamped to exp(-1e-7) (a clamp
    with torch.clamp's gradient: none when it clamps). A row with no valid entry: log 1 = 0."""
    total = _logsumexp_over(lp, valid).clamp(max=TAIL_CLAMP)
    return torch.log(-torch.expm1(total))


def _reduce(row, rows, reduction, lead, acc):
    if reduction == "none":
        return row.reshape(lead)
    total = row.to(torch.float64).sum()  # in float64, in row order, as the kernels reduce
    if reduction != "sum":
        total = total / rows.sum().clamp(min=1).to(torch.float64)
    return total.to(acc)
