"""Fused linear + top-k distillation loss: :func:`linear_topk_kd_loss` and
:class:`LinearTopKKDLoss`.

The loss of :func:`kdfused.topk_kd_loss` on ``F.linear(hidden, weight, bias)`` logits, computed a
chunk of rows at a time so that the N x V logits (and their gradient) never exist: per chunk one
GEMM gives the chunk's logits, the top-k op (``torch.ops.kdfused.topk_kd_loss``) gives the chunk's
loss and logit gradient, and two more GEMMs fold that gradient into the gradients of the hidden
states and the weight. Like every kdfused loss, the gradients are computed in the forward call and
the backward only scales them (``kdfused._backward``: in place, no double backward).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Optional

import torch

from . import _C, _backward, _checks
from ._checks import FLOAT_DTYPES
from ._options import TOPK_PARAMETERS, TopKLossOptions, takes_options
from .topk import TopKKDLoss, TopKOptions, _topk_options

if TYPE_CHECKING:
    from typing_extensions import Unpack

_WHO = "kdfused.linear_topk_kd_loss"
_INDEX_DTYPES = (torch.int64, torch.int32)
_SIXTEEN_BIT = (torch.float16, torch.bfloat16)
# Inputs of _LinearTopKFunction.forward (its backward returns one gradient per input).
_N_INPUTS = 10


def _check_chunk_size(chunk_size) -> int:
    return _checks.check_chunk_size(_WHO, chunk_size)


def _check_tensors(h, w, b, idx, val, labels) -> None:
    """Shapes, dtypes and devices, before anything is computed (the op checks each chunk again,
    but its messages would speak of chunk-sized logits the caller never made)."""
    required = (("student_hidden", h), ("student_weight", w))
    required += (("teacher_indices", idx), ("teacher_values", val))
    optional = (("student_bias", b), ("labels", labels))
    _checks.check_tensor_types(_WHO, required, optional)
    if h.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{_WHO}: student_hidden must be float16, bfloat16, float32 or float64, got {h.dtype}"
        )
    for name, t in (("student_weight", w), ("student_bias", b)):
        if t is not None and t.dtype != h.dtype:
            raise TypeError(
                f"{_WHO}: {name} must have student_hidden's dtype {h.dtype}, got {t.dtype}"
            )
    if idx.dtype not in _INDEX_DTYPES:
        raise TypeError(f"{_WHO}: teacher_indices must be int64 or int32, got {idx.dtype}")
    if val.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{_WHO}: teacher_values must be float16, bfloat16, float32 or float64, got {val.dtype}"
        )
    if labels is not None and labels.dtype not in _INDEX_DTYPES:
        raise TypeError(f"{_WHO}: labels must be int64 (or int32), got {labels.dtype}")
    _check_shapes(h, w, b, idx, val, labels)
    devices = {t.device for t in (h, w, b, idx, val, labels) if t is not None}
    if len(devices) > 1:
        raise RuntimeError(
            f"{_WHO}: every tensor must be on one device, got {sorted(map(str, devices))}"
        )


def _check_shapes(h, w, b, idx, val, labels) -> None:
    if h.dim() < 1 or h.shape[-1] < 1:
        raise ValueError(f"{_WHO}: student_hidden must be (..., H) with H >= 1")
    H = h.shape[-1]
    if w.dim() != 2 or w.shape[1] != H or w.shape[0] < 1:
        raise ValueError(
            f"{_WHO}: student_weight must be (V, H) with H = {H} (student_hidden's last dim) and "
            f"V >= 1, got {tuple(w.shape)}"
        )
    V = w.shape[0]
    if b is not None and tuple(b.shape) != (V,):
        raise ValueError(f"{_WHO}: student_bias must be (V,) = ({V},), got {tuple(b.shape)}")
    lead = tuple(h.shape[:-1])
    if idx.dim() != h.dim() or tuple(idx.shape[:-1]) != lead:
        raise ValueError(
            f"{_WHO}: teacher_indices must be (..., k) with student_hidden's leading dims "
            f"{lead} (one row per hidden state), got {tuple(idx.shape)}"
        )
    if val.shape != idx.shape:
        raise ValueError(
            f"{_WHO}: teacher_values must have the shape of teacher_indices "
            f"{tuple(idx.shape)}, got {tuple(val.shape)}"
        )
    if not 1 <= idx.shape[-1] <= V:
        raise ValueError(
            f"{_WHO}: k (the last dim of teacher_indices) must be in [1, V = {V}], "
            f"got {idx.shape[-1]}"
        )
    if labels is not None and tuple(labels.shape) != lead:
        raise ValueError(f"{_WHO}: labels must have shape {lead}, got {tuple(labels.shape)}")


def _chunk_step(logits, idx, val, labels, op_args: tuple, need: bool):
    """One chunk through the top-k op: (the chunk's loss, reduced as ``op_args`` says, and the
    gradient of its sum w.r.t. ``logits`` -- an empty tensor when ``need`` is False)."""
    loss, grad, _ = torch.ops.kdfused.topk_kd_loss(logits, idx, val, labels, *op_args, need)
    return loss, grad


def _chunk_op_args(options: TopKOptions, reduction: str) -> tuple:
    # Every chunk is reduced by "sum" (or kept per row for "none"): the mean's divisor is the
    # valid rows of the whole call, which one chunk does not know.
    kd = dataclasses.replace(options.options, reduction=reduction)
    return dataclasses.replace(options, options=kd).op_args


def _valid_rows(labels, ignore_index: int, n: int):
    """The mean's divisor: the rows whose label is not ignore_index (all rows without labels),
    at least 1. A tensor on the labels' device: counting them needs no host sync."""
    if labels is None:
        return max(n, 1)
    return (labels != ignore_index).sum().clamp_(min=1)


def _all_ignored(labels, ignore_index: int) -> bool:
    # Only on the CPU, where asking costs no device sync: such a chunk has 0 loss and 0
    # gradient, so its GEMMs can be skipped.
    if labels is None or labels.device.type != "cpu":
        return False
    return not (labels != ignore_index).any()


class _Grads:
    """The gradients being accumulated over the chunks: hidden (written per chunk), weight and
    bias (summed over chunks, in float32 for 16-bit weights: one rounding at the end rather than
    one per chunk)."""

    def __init__(self, h, w, b, need: tuple):
        acc = torch.float32 if w.dtype in _SIXTEEN_BIT else w.dtype
        self.acc = acc
        # Every row of the hidden gradient is written once (by its chunk, or zeroed: skip()).
        self.h = torch.empty(h.shape, dtype=h.dtype, device=h.device) if need[0] else None
        self.w = torch.zeros(w.shape, dtype=acc, device=w.device) if need[1] else None
        self.b = torch.zeros(w.shape[0], dtype=acc, device=w.device) if need[2] else None

    def fold(self, g, rows: slice, h_chunk, w) -> None:
        """Add the chunk's logit gradient ``g`` (rows x V) to the gradients."""
        if self.h is not None:
            torch.mm(g, w, out=self.h[rows])
        if self.w is not None:
            if g.dtype != self.acc:
                # 16-bit: the product in float32 (a chunk-sized copy of g), so the sum over
                # chunks keeps float32 precision -- as kd_linear_loss does it.
                self.w.addmm_(g.t().to(self.acc), h_chunk.to(self.acc))
            else:
                self.w.addmm_(g.t(), h_chunk)
        if self.b is not None:
            self.b.add_(g.sum(0, dtype=self.acc))

    def skip(self, rows: slice) -> None:
        """A chunk without gradient (every row ignored)."""
        if self.h is not None:
            self.h[rows].zero_()

    def finish(self, w, b, divisor) -> tuple:
        """(grad hidden, grad weight, grad bias), divided by the mean's divisor (1: none), in the
        parameters' dtypes (None where not asked for)."""
        out = []
        for acc, like in ((self.h, None), (self.w, w), (self.b, b)):
            if acc is not None:
                if not (isinstance(divisor, int) and divisor == 1):
                    acc.div_(divisor)
                if like is not None and acc.dtype != like.dtype:
                    acc = acc.to(like.dtype)
            out.append(acc)
        return tuple(out)


def _run_chunks(h, w, b, idx, val, labels, op_args, chunk, need, ignore_index, row_weight=None):
    """The chunk loop: (per-chunk losses, :class:`_Grads` or None). ``row_weight`` (rows,)
    multiplies each row's logit gradient (reduction "none"'s backward: the rows' grad_output)."""
    N = h.shape[0]
    grads = _Grads(h, w, b, need) if any(need) else None
    losses = []
    for start in range(0, N, chunk):
        rows = slice(start, min(N, start + chunk))
        y = None if labels is None else labels[rows]
        if _all_ignored(y, ignore_index):
            losses.append(None)  # 0 loss, 0 gradient
            if grads is not None:
                grads.skip(rows)
            continue
        h_c = h[rows]
        # One GEMM in the hidden dtype: the op reads 16-bit logits directly.
        logits = h_c @ w.t() if b is None else torch.addmm(b, h_c, w.t())
        loss, g = _chunk_step(logits, idx[rows], val[rows], y, op_args, grads is not None)
        losses.append(loss)
        del logits
        if grads is not None:
            if row_weight is not None:
                # (the product in the wider dtype, rounded once into a 16-bit g)
                g.mul_(row_weight[rows, None])
            grads.fold(g, rows, h_c, w)
    return losses, grads


class _LinearTopKFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, w, b, idx, val, labels, options: TopKOptions, chunk, acc_dtype, need):
        # need: (hidden, weight, bias) gradient flags, decided by the caller (under no_grad
        # ctx.needs_input_grad still reports requires_grad, and the gradients would be wasted).
        reduction = options.options.reduction
        ignore_index = options.options.ignore_index
        if reduction == "none":
            # Every row has its own grad_output, which the weight's gradient needs inside the sum
            # over rows: the backward runs the chunks again (no N x V state is kept).
            losses, _ = _run_chunks(
                h, w, b, idx, val, labels, _chunk_op_args(options, "none"), chunk,
                (False, False, False), ignore_index,
            )  # fmt: skip
            ctx.save_for_backward(h, w, b, idx, val, labels)
            ctx.kd_chunk = (options, chunk)
            ctx.kd_need = need
            ctx.kd_recompute = _recompute
            return _row_losses(losses, h, chunk, acc_dtype)
        op_args = _chunk_op_args(options, "sum")
        losses, grads = _run_chunks(h, w, b, idx, val, labels, op_args, chunk, need, ignore_index)
        total = _sum_losses(losses, h)
        divisor = 1
        if reduction in ("mean", "batchmean"):
            divisor = _valid_rows(labels, ignore_index, h.shape[0])
            total = total / divisor  # in float64, then rounded once
        total = total.to(acc_dtype)
        if grads is None:
            _backward.keep(ctx, need, None)
        else:
            out = grads.finish(w, b, divisor)
            empty = h.new_empty((0,))
            kept = tuple(empty if x is None else x for x in out)
            # grad_scale: the grad_output the kept gradients are scaled for (kd_scale_grads_).
            _backward.keep(ctx, need, kept + (torch.ones_like(total),))
        return total

    @staticmethod
    def backward(ctx, grad_loss):
        if getattr(ctx, "kd_recompute", None) is None and ctx.kd_grads is None:
            return (None,) * _N_INPUTS  # nothing required a gradient
        return _backward.backward(ctx, grad_loss, _N_INPUTS, "linear_topk_kd_loss")


def _recompute(ctx, grad_loss) -> tuple:
    """Reduction "none"'s backward: the chunks again, each row's logit gradient times its
    grad_output."""
    h, w, b, idx, val, labels = ctx.saved_tensors
    options, chunk = ctx.kd_chunk
    op_args = _chunk_op_args(options, "sum")  # per row, the same gradient as "none"'s
    _, grads = _run_chunks(
        h, w, b, idx, val, labels, op_args, chunk, ctx.kd_need, options.options.ignore_index,
        row_weight=grad_loss.reshape(-1),
    )  # fmt: skip
    return grads.finish(w, b, 1)


def _sum_losses(losses, h):
    # In float64, in chunk order: the loss does not depend on the chunk size beyond rounding.
    parts = [x.to(torch.float64) for x in losses if x is not None]
    if not parts:
        return torch.zeros((), dtype=torch.float64, device=h.device)
    return torch.stack(parts).sum()


def _row_losses(losses, h, chunk, acc_dtype):
    parts = []
    for i, x in enumerate(losses):
        n = min(chunk, h.shape[0] - i * chunk)
        parts.append(torch.zeros(n, dtype=acc_dtype, device=h.device) if x is None else x)
    if not parts:
        return torch.zeros((0,), dtype=acc_dtype, device=h.device)
    return torch.cat(parts).to(acc_dtype)


def _check_teacher_grad(val) -> None:
    if val.requires_grad:
        raise ValueError(
            f"{_WHO}: teacher_values must not require grad: the stored teacher gets no "
            f"gradient (detach it)"
        )


def _dispatch(h, w, b, idx, val, labels, options: TopKOptions, chunk: int):
    _check_tensors(h, w, b, idx, val, labels)
    _check_teacher_grad(val)
    if labels is None and options.options.hard_weight != 0:
        raise ValueError(f"{_WHO}: hard_weight > 0 needs labels (got labels=None)")
    lead, H = tuple(h.shape[:-1]), h.shape[-1]
    flat = (h.reshape(-1, H), idx.reshape(-1, idx.shape[-1]), val.reshape(-1, val.shape[-1]))
    y = None if labels is None else labels.reshape(-1)
    N, V = flat[0].shape[0], w.shape[0]
    rows = chunk or _C.auto_chunk_rows(N, V, h.element_size())
    acc = torch.float64 if torch.float64 in (h.dtype, val.dtype) else torch.float32
    grad_on = torch.is_grad_enabled()
    need = (grad_on and h.requires_grad, grad_on and w.requires_grad)
    need += (grad_on and b is not None and b.requires_grad,)
    args = (options, rows, acc, need)
    loss = _LinearTopKFunction.apply(flat[0], w, b, flat[1], flat[2], y, *args)
    return loss.reshape(lead) if options.options.reduction == "none" else loss


@takes_options(TOPK_PARAMETERS, after="student_bias")
def linear_topk_kd_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_indices: torch.Tensor,
    teacher_values: torch.Tensor,
    labels: Optional[torch.Tensor] = None,
    *,
    student_bias: Optional[torch.Tensor] = None,
    chunk_size: Optional[int] = None,
    **options: Unpack[TopKLossOptions],
) -> torch.Tensor:
    r"""Top-k distillation loss of the student's output layer, without N x V logits.

    Equals ``kdfused.topk_kd_loss(F.linear(student_hidden, student_weight, student_bias),
    teacher_indices, teacher_values, labels, ...)`` with the same options. The rows are processed
    ``chunk_size`` at a time: per chunk one GEMM gives the chunk's logits (in the hidden states'
    dtype), the fused top-k kernel the chunk's loss and logit gradient, and two more GEMMs fold
    that gradient into the gradients of ``student_hidden`` and ``student_weight`` (a column sum
    into ``student_bias``). Extra memory is O(chunk x V) plus the gradients themselves.

    Args:
        student_hidden: ``(..., H)`` float16/bfloat16/float32/float64; ``student_weight``
            ``(V, H)`` and ``student_bias`` ``(V,)`` (or None) of the same dtype. Each gets a
            gradient when it requires grad.
        teacher_indices: ``(..., k)`` int64/int32 with the hidden states' leading dims;
            teacher_values: ``(..., k)`` float, not requiring grad (``ValueError``): the stored
            teacher, as :func:`kdfused.topk_kd_loss` takes it (``-inf`` marks padding).
        labels, temperature, soft_weight, hard_weight, divergence, beta, support, values,
            ignore_index, reduction, student_logit_scale, teacher_logit_scale, student_softcap,
            teacher_softcap: as for :func:`kdfused.topk_kd_loss`; the student's transform
            applies to ``student_hidden @ student_weight.T + student_bias``.
        chunk_size: rows per chunk, > 0; ``None`` picks the rows as :func:`kdfused.linear_kd_loss`
            does (about 64 MiB of chunk logits; N = 4096, V = 32000 float32: 512 rows).

    Returns:
        The loss, as :func:`kdfused.topk_kd_loss` returns it (float32, or float64 when the hidden
        states or the teacher values are float64); ``(...)`` per row for ``reduction="none"``.

    The gradients are computed in the forward call; ``loss.backward()`` only scales them by
    grad_output. ``"mean"``/``"batchmean"`` divide by the valid rows of the whole call (counted on
    the device, no host sync). For ``reduction="none"`` no gradient is kept: the backward runs
    the chunks again with each row's grad_output. The weight and bias gradients are sums over
    chunks (float32 for 16-bit weights, rounded once), so they may differ across chunk sizes by
    summation order. On the CPU, chunks whose rows are all ignored skip their GEMMs. Double
    backward raises RuntimeError.
    """
    parsed = _topk_options("linear_topk_kd_loss", options)
    chunk = _check_chunk_size(chunk_size)
    tensors = (student_hidden, student_weight, student_bias, teacher_indices, teacher_values)
    return _dispatch(*tensors, labels, parsed, chunk)


class LinearTopKKDLoss(TopKKDLoss):
    """Module form of :func:`linear_topk_kd_loss`; the keywords are checked when the module is
    built and read as attributes (setting one checks them again), as :class:`TopKKDLoss`'s;
    ``chunk_size`` is a plain attribute.

    Example::

        >>> crit = LinearTopKKDLoss(temperature=2.0, support="tail", values="logprobs",
        ...                         soft_weight=0.9, hard_weight=0.1)
        >>> loss = crit(hidden, lm_head.weight, stored_indices, stored_logprobs, labels)
    """

    _function = linear_topk_kd_loss
    _extra = ("support", "values", "chunk_size")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        bound = self.__signature__.bind(*args, **kwargs)
        bound.apply_defaults()
        self.chunk_size = bound.arguments["chunk_size"]
        _check_chunk_size(self.chunk_size)

    def forward(
        self,
        student_hidden: torch.Tensor,
        student_weight: torch.Tensor,
        teacher_indices: torch.Tensor,
        teacher_values: torch.Tensor,
        labels: Optional[torch.Tensor] = None,
        *,
        student_bias: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        chunk = _check_chunk_size(self.chunk_size)
        tensors = (student_hidden, student_weight, student_bias, teacher_indices, teacher_values)
        return _dispatch(*tensors, labels, self.options, chunk)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, chunk_size={self.chunk_size}"
