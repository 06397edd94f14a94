"""Pure-PyTorch reference implementation of :func:`kdfused.kd_loss`: the executable specification.

Same signature, the same argument checks (``kdfused._checks``: same exception types and messages
as the fused op) and the same semantics, written with ordinary tensor ops so that autograd
supplies the gradients (of the student and, when it requires grad, of the teacher). It needs no
compiled extension: ``import kdfused.reference`` works where kdfused was never built. It
materialises several N x V tensors and is meant for testing and as a readable specification, not
for speed. The maths, and how the kernels compute the same quantities, are in docs/design.md.

Logit transform, per side, from the raw logits x (student_logit_scale / student_softcap for the
student, teacher_logit_scale / teacher_softcap for the teacher): z = scale * x, then, when a
softcap c is given, z = c * tanh(z / c). A -inf raw logit stays -inf (a masked column stays
masked, whatever the scale) and gets gradient 0. With the defaults (scale 1, no softcap) z is x
itself, untouched. Below, s and t are the student's and the teacher's z; autograd carries the
gradient through the transform (dz/dx = scale * (1 - tanh^2(scale * x / c)), or scale without a
softcap). The transform and return_entropy (below) are keywords of this module's functions only:
``kdfused.kd_loss`` and ``kdfused.topk_kd_loss`` do not take them.

Per row, with T the temperature, p = softmax(t / T) (teacher) and q = softmax(s / T) (student):

    loss_row = soft_weight * T^2 * D(p, q) + hard_weight * CE(s, y)

    "kl"          D = KL(p || q)  = sum p (log p - log q)
    "ce"          D = -sum p log q
    "reverse_kl"  D = KL(q || p)  = sum q (log q - log p)
    "jsd"         D = beta KL(p || m) + (1 - beta) KL(q || m),  m = beta p + (1 - beta) q;
                  beta = 0 is exactly "kl", beta = 1 exactly "reverse_kl" (the same code path)
    "tvd"         D = 0.5 sum |p - q|   (subgradient 0 where p == q)

Rules (the fused op's):

- Accumulation in float32 for 16/32-bit inputs, float64 when either input is float64; the loss
  has that dtype; each gradient comes back in its input's dtype.
- Tempered logits are taken relative to the row maximum, (x - max x) / T, so that T = 0.05 with
  logits ~1e4 loses no precision (x / T would round every exponent).
- A term whose weight is exactly 0 is not computed: nothing the teacher holds (inf, NaN) reaches
  the loss when soft_weight == 0, nor a -inf student logit at the label when hard_weight == 0.
- Masked vocabulary: an entry with probability 0 on the side that weights it contributes 0, never
  0 * inf = NaN (loss and gradients): a -inf column shared by student and teacher contributes
  nothing; where one side has mass and the other a -inf logit, KL / reverse KL is +inf;
  log(q / m) at q = 0 contributes 0. A row that is -inf everywhere gives NaN, like softmax.
- Rows whose label equals ignore_index contribute 0 to the loss and exactly 0 to every gradient,
  whatever they hold (-inf, NaN): they are replaced by zeros before anything is computed.
- Reductions: the row losses are summed in float64 in row order; "batchmean" / "mean" divide by
  the number of valid rows (0.0 when there is none).

return_entropy=True also returns the student's entropy per row, H = -sum_v q_v log q_v with
q = softmax(s / T) (after the transform): shaped like the leading dims, in the accumulation dtype,
without gradient; a masked column contributes 0, an ignored row has H = 0. The loss is the one of
return_entropy=False, bitwise. With soft_weight = 1 / T^2, divergence "jsd" and reduction "mean",
the loss is TRL's generalised JSD per token, averaged over the tokens whose label is not
ignore_index.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Optional

import torch
import torch.nn.functional as F

from . import _checks
from ._checks import DIVERGENCES, REDUCTIONS, effective_divergence
from ._options import LossOptions, parse_keywords, takes_options

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = [
    "kd_loss",
    "topk_kd_loss",
    "divergence_rows",
    "logit_transform",
    "entropy_rows",
    "DIVERGENCES",
    "REDUCTIONS",
]


def _acc_dtype(*tensors: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(x.dtype == torch.float64 for x in tensors) else torch.float32


def _tempered_log_softmax(x: torch.Tensor, T: float) -> torch.Tensor:
    """log softmax(x / T) over the last dim, from the differences to the row maximum. The shift
    is detached: it is a constant of the softmax, and its (mathematically zero) gradient would
    only add rounding noise at the arg-max. A row that is -inf everywhere stays NaN."""
    m = x.detach().amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    return F.log_softmax((x - m) / T, dim=-1)


def logit_transform(x: torch.Tensor, scale: float = 1.0, softcap: Optional[float] = None):
    """z = scale * x, then z = softcap * tanh(z / softcap) when softcap is given; a -inf entry of
    x stays -inf, with gradient 0 (computed from 0 in its place, so no inf or NaN reaches the
    backward). With scale == 1 and no softcap, x itself is returned (no operation at all)."""
    if scale == 1.0 and softcap is None:
        return x
    masked = torch.isneginf(x)
    z = torch.where(masked, torch.zeros_like(x), x)
    if scale != 1.0:
        z = z * scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return torch.where(masked, torch.full_like(z, -math.inf), z)


def entropy_rows(s: torch.Tensor, T: float) -> torch.Tensor:
    """-sum_v q_v log q_v per row, q = softmax(s / T); a column with q_v == 0 contributes 0. No
    gradient. A row that is -inf everywhere gives NaN, like softmax."""
    with torch.no_grad():
        log_q = _tempered_log_softmax(s.detach(), T)
        q = log_q.exp()
        return -_masked(q == 0, q * _masked(q == 0, log_q)).sum(-1)


def _masked(no_mass: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    # torch.where passes a zero gradient to the branch it did not select; the values in that
    # branch must still be finite, or its backward computes 0 * inf = NaN. Hence the logs are
    # replaced (not only the terms) wherever the weighting probability is 0.
    return torch.where(no_mass, torch.zeros_like(x), x)


def divergence_rows(
    log_p: torch.Tensor, log_q: torch.Tensor, divergence: str, beta: float = 0.5
) -> torch.Tensor:
    """D(p, q) per row from the log-probabilities (the last dim is the vocabulary)."""
    divergence = effective_divergence(divergence, beta)
    p, q = log_p.exp(), log_q.exp()
    # "== 0", not "> 0": a NaN probability (a row with no distribution) must stay NaN.
    p0, q0 = p == 0, q == 0
    if divergence == "kl":
        lp, lq = _masked(p0, log_p), _masked(p0, log_q)
        return _masked(p0, p * (lp - lq)).sum(-1)
    if divergence == "ce":
        return _masked(p0, -p * _masked(p0, log_q)).sum(-1)
    if divergence == "reverse_kl":
        lq, lp = _masked(q0, log_q), _masked(q0, log_p)
        return _masked(q0, q * (lq - lp)).sum(-1)
    if divergence == "jsd":
        # 0 < beta < 1 here. log m = log(beta p + (1 - beta) q) in log space (logaddexp), so that
        # log(p / m) keeps its precision where p and q are tiny; where one side has no mass,
        # log m is the other side's term alone. Where neither has mass nothing is used.
        lb, l1b = math.log(beta), math.log1p(-beta)
        lp, lq = _masked(p0, log_p), _masked(q0, log_q)
        both = torch.logaddexp(lb + lp, l1b + lq)
        lm = torch.where(p0, l1b + lq, torch.where(q0, lb + lp, both))
        kl_pm = _masked(p0, p * (lp - lm)).sum(-1)
        kl_qm = _masked(q0, q * (lq - lm)).sum(-1)
        return beta * kl_pm + (1.0 - beta) * kl_qm
    if divergence == "tvd":
        # |x|'s autograd subgradient at 0 is 0: no gradient where p == q (e.g. masked columns).
        return 0.5 * (p - q).abs().sum(-1)
    raise AssertionError(divergence)  # (checked before)


@takes_options()
def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: Optional[torch.Tensor] = None,
    *,
    return_entropy: bool = False,
    process_group=None,
    **options: Unpack[LossOptions],
):
    """Knowledge-distillation loss, pure PyTorch (see :func:`kdfused.kd_loss` for the contract
    and this module's docstring for the formulas and rules).

    ``student_logit_scale`` / ``student_softcap`` and ``teacher_logit_scale`` / ``teacher_softcap``
    transform each side's logits first: z = scale * x, then z = softcap * tanh(z / softcap) when a
    softcap is given (a -inf logit stays -inf); both terms, the soft one on softmax(z / T) and the
    hard cross-entropy on the student's z at T = 1, use z. A scale must be finite (0 and negative
    are accepted), a softcap None or finite and > 0 (``ValueError`` otherwise, ``TypeError`` for a
    wrong type). ``return_entropy=True`` returns ``(loss, entropy)``: the entropy of the student's
    q = softmax(z / T) per row, shaped like the leading dims, in the loss's accumulation dtype,
    detached, 0 at ignored rows; the loss is unchanged.

    With ``process_group`` (vocabulary-parallel: each process holds a slice of the last dim, in
    rank order) the slices are gathered with plain ``torch.distributed.all_gather`` into whole
    rows, the loss above is computed on them, and autograd gives each process the gradient of its
    own slice (the other slices enter as constants). Memory: the whole rows, on every process."""
    if process_group is not None:
        student_logits, teacher_logits = _gather_vocab(
            student_logits, teacher_logits, process_group
        )
    _checks.check_logits_types(student_logits, teacher_logits, labels)
    options = parse_keywords("kd_loss", options)
    _checks.check_flag("return_entropy", return_entropy)
    _checks.check_inputs(student_logits, teacher_logits, labels, options.hard_weight)
    V = student_logits.shape[-1]
    ignore_index = options.ignore_index
    _checks.check_label_values(labels, V, ignore_index)

    T, ws, wh = options.temperature, options.soft_weight, options.hard_weight
    acc = _acc_dtype(student_logits, teacher_logits)
    lead = student_logits.shape[:-1]
    s = student_logits.to(acc).reshape(-1, V)
    n = s.shape[0]
    device = s.device

    if labels is not None:
        y = labels.reshape(-1).to(torch.int64)
        valid = y != ignore_index
    else:
        y = None
        valid = torch.ones(n, dtype=torch.bool, device=device)
    # Ignored rows are replaced by zeros: whatever they hold (-inf padding, NaN) reaches neither
    # the loss nor a gradient (where() gives them a zero gradient).
    vm = valid.unsqueeze(1)
    s = torch.where(vm, s, torch.zeros_like(s))

    t = teacher_logits.to(acc).reshape(-1, V)
    t = torch.where(vm, t, torch.zeros_like(t))
    s = logit_transform(s, options.student_logit_scale, options.student_softcap)
    if ws != 0:
        # (part of the soft term: with soft_weight == 0, an inf or NaN the teacher holds reaches
        # no gradient through the transform either)
        t = logit_transform(t, options.teacher_logit_scale, options.teacher_softcap)
    # Zero, but linked to both inputs (gradient exactly 0, never NaN), so that the loss needs
    # grad and each input gets a gradient even when a term is off, as from the fused op.
    no = torch.zeros_like(vm)
    row = (torch.where(no, s, torch.zeros_like(s)) + torch.where(no, t, torch.zeros_like(t))).sum(
        -1
    )
    if ws != 0:
        lp, lq = _tempered_log_softmax(t, T), _tempered_log_softmax(s, T)
        D = divergence_rows(lp, lq, options.divergence, options.beta)
        row = row + ws * T * T * D
    if wh != 0:
        safe_y = torch.where(valid, y, torch.zeros_like(y))
        hard = -F.log_softmax(s, dim=-1).gather(1, safe_y.unsqueeze(1)).squeeze(1)
        row = row + wh * hard
    row = torch.where(valid, row, torch.zeros_like(row))

    if options.reduction == "none":
        loss = row.reshape(lead)
    else:
        total = row.to(torch.float64).sum()  # in float64, in row order, as the kernels reduce
        if options.reduction != "sum":
            total = total / valid.sum().clamp(min=1).to(torch.float64)
        loss = total.to(acc)
    if not return_entropy:
        return loss
    H = entropy_rows(s, T)
    H = torch.where(valid, H, torch.zeros_like(H))
    return loss, H.reshape(lead)


def _gather_vocab(student: torch.Tensor, teacher: torch.Tensor, group):
    """Whole rows from every process's slice (in rank order); this process's own slice stays the
    tensor it was (so its gradient flows back to it), the others are detached copies."""
    import torch.distributed as dist

    world, rank = dist.get_world_size(group), dist.get_rank(group)
    width = torch.tensor([student.shape[-1]], dtype=torch.int64, device=student.device)
    widths = [torch.empty_like(width) for _ in range(world)]
    dist.all_gather(widths, width, group=group)
    widths = [int(w.item()) for w in widths]
    wmax = max(widths)
    whole = []
    for x in (student, teacher):
        pad = torch.full(x.shape[:-1] + (wmax,), float("nan"), dtype=x.dtype, device=x.device)
        pad[..., : x.shape[-1]] = x.detach()
        parts = [torch.empty_like(pad) for _ in range(world)]
        dist.all_gather(parts, pad.contiguous(), group=group)
        pieces = [x if k == rank else parts[k][..., : widths[k]] for k in range(world)]
        whole.append(torch.cat(pieces, dim=-1))
    return whole[0], whole[1]


# The top-k op's specification lives in its own module (pure PyTorch as well).
from ._reference_topk import topk_kd_loss  # noqa: E402
