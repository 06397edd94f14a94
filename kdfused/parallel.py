"""Vocabulary-parallel distillation loss over ``torch.distributed`` (``process_group=``).

With a process group, each process holds a contiguous slice of every row's vocabulary (the last
dim of the logits; for :func:`kdfused.linear_kd_loss` the rows of the lm-head weight), slices in
group-rank order, possibly of different sizes. No process ever has a whole row. The fused kernels
already reduce a row to a small mergeable record (maxima, sums of exponentials, cross terms:
``SliceStats`` in csrc/kd_math.h), so the loss needs one exchange of those records:

1. ``kd_vp_stats``: each process sweeps its slice -> one record per row (10 floats);
2. ``all_gather`` of the records; every process merges them **in rank order** with the kernels'
   own ``merge()`` (``kd_vp_merge``): the row constants, and so the loss, are bitwise identical
   on every process, whatever the timing;
3. jsd / tvd only: a second sweep and ``all_gather`` of 3 sums per row (``kd_vp_mix``,
   ``kd_vp_merge_mix``);
4. ``kd_vp_grad``: the slice's gradients from the whole row's constants (no communication).

Before that, one small ``all_gather`` of each process's metadata (rows, slice width, dtypes,
options, a checksum of the labels) finds the slice offsets and lets every process raise the same
error for inconsistent inputs instead of blocking in a collective.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from . import _C
from ._backward import backward, keep, with_entropy
from ._checks import check_label_values, check_logit_transform
from ._ops import _lib_ops
from ._options import KDOptions

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _dtype_code(x: Optional[torch.Tensor]) -> int:
    if x is None:
        return -1
    return _DTYPES.index(x.dtype) if x.dtype in _DTYPES else 99


def _label_checksum(labels: Optional[torch.Tensor]) -> int:
    # Order-sensitive (weighted by position) and cheap; int64 arithmetic wraps, which is fine for
    # a checksum compared for equality.
    if labels is None:
        return 0
    y = labels.reshape(-1).to(torch.int64)
    w = torch.arange(1, y.numel() + 1, dtype=torch.int64, device=y.device)
    return int((y * w).sum().item()) ^ (y.numel() << 1)


_META_FIELDS = (
    "failed",
    "rows",
    "slice width",
    "student dtype",
    "teacher dtype",
    "labels checksum",
    "options",
    "hidden size",
)


class Slice:
    """This process's place in the vocabulary: ``offset`` (its first global column), ``total``
    (the whole vocabulary), ``sizes`` (every rank's slice width, in rank order)."""

    def __init__(self, offset: int, total: int, sizes: list[int], rank: int, world: int):
        self.offset, self.total, self.sizes, self.rank, self.world = (
            offset,
            total,
            sizes,
            rank,
            world,
        )


def exchange_metadata(
    who: str,
    group,
    device: torch.device,
    rows: int,
    width: int,
    student: Optional[torch.Tensor],
    teacher: Optional[torch.Tensor],
    labels: Optional[torch.Tensor],
    options: KDOptions,
    hidden: int = 0,
    local_error: Optional[Exception] = None,
    extra: tuple = (),
) -> Slice:
    """One ``all_gather`` of a few int64 per process; raises the same ValueError on every process
    when they disagree on anything that must agree (then no other collective is started).
    ``local_error``: this process's own input check failed; it still takes part in the exchange
    (so that no other process blocks), then raises it, and the others raise a ValueError naming
    the failed ranks. ``extra``: more options that must agree (compared with ``options``)."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(f"{who}: process_group given but torch.distributed is not initialized")
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    mine = torch.tensor(
        [
            int(local_error is not None),
            rows,
            width,
            _dtype_code(student),
            _dtype_code(teacher),
            _label_checksum(labels),
            options.exchange_code(*extra),
            hidden,
        ],
        dtype=torch.int64,
        device=device,
    )
    table = gather(mine, group, world).cpu().tolist()
    failed = [r for r, row in enumerate(table) if row[0]]
    if local_error is not None:
        raise local_error
    if failed:
        raise ValueError(
            f"{who}: the inputs of rank(s) {failed} of the process group failed their checks "
            f"(the error is raised there)"
        )
    for i, field in enumerate(_META_FIELDS):
        if field in ("failed", "slice width"):
            continue
        values = [r[i] for r in table]
        if len(set(values)) > 1:
            detail = {
                "rows": "every process must hold the same rows (the logits' leading shape)",
                "student dtype": "the student slices must have one dtype on every process",
                "teacher dtype": "the teacher slices must have one dtype on every process",
                "labels checksum": "labels must be identical on every process",
                "options": "the loss options (temperature, weights, divergence, beta, "
                "ignore_index, reduction) must be identical on every process",
                "hidden size": "the hidden states must have the same size on every process",
            }[field]
            raise ValueError(
                f"{who}: inconsistent inputs across the process group: {detail}; "
                f"{field} per rank: {values}"
            )
    sizes = [r[_META_FIELDS.index("slice width")] for r in table]
    if min(sizes) < 1:
        raise ValueError(
            f"{who}: every process must hold at least one vocabulary column; slice widths per "
            f"rank: {sizes}"
        )
    total = sum(sizes)
    # Labels are identical everywhere (checksum above): every process raises the same error,
    # before any kernel runs (on CUDA a kernel could only assert).
    whole = " (the whole vocabulary over the process group)"
    check_label_values(labels, total, options.ignore_index, who, whole)
    return Slice(sum(sizes[:rank]), total, sizes, rank, world)


def gather(x: torch.Tensor, group, world: int) -> torch.Tensor:
    """Every process's ``x`` (same shape everywhere), stacked in rank order: ``(world, *x.shape)``.
    One collective (``all_gather_single``, called ``all_gather_into_tensor`` before torch 2.14),
    into the concatenated form that every backend accepts."""
    x = x.contiguous()
    out = torch.empty((world * x.shape[0],) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    _ALL_GATHER(out, x, group=group)
    return out.view((world,) + tuple(x.shape))


_ALL_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def slice_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: Optional[torch.Tensor],
    sl: Slice,
    group,
    options: KDOptions,
    reduction: str,
    grad_student: bool,
    grad_teacher: bool,
    entropy: bool = False,
):
    """The steps of the module docstring on this process's slice; returns kd_vp_grad's
    (loss, grad_student, grad_teacher, grad_scale) and the rows' entropy (the leading shape; None
    unless ``entropy``). ``reduction`` overrides the options' own."""
    opts, ignore_index, lmap = options.loss_args, options.ignore_index, options.logit_map
    stats = _lib_ops.kd_vp_stats(
        student, teacher, labels, sl.offset, sl.total, *opts, ignore_index, lmap, entropy
    )
    fin = _lib_ops.kd_vp_merge(
        gather(stats, group, sl.world), labels, *opts, ignore_index, reduction, lmap, entropy
    )
    if options.mixes:
        mix = _lib_ops.kd_vp_mix(
            student, teacher, labels, fin, sl.offset, *opts, ignore_index, lmap
        )
        fin = _lib_ops.kd_vp_merge_mix(fin, gather(mix, group, sl.world), *opts)
    loss, gs, gt, scale, _ = _lib_ops.kd_vp_grad(
        student, teacher, labels, fin, sl.offset, *opts, ignore_index, reduction, lmap,
        grad_student, grad_teacher,
    )  # fmt: skip
    # The whole row's entropy is in its merged record (the same on every process).
    ent = fin[:, _C.row_final_entropy_field].reshape(student.shape[:-1]) if entropy else None
    return loss, gs, gt, scale, ent


class _VocabParallelKD(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, teacher, labels, group, options, entropy):
        need_s, need_t = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        rows = student.numel() // max(student.shape[-1], 1) if student.dim() else 1
        reduction = options.reduction
        local_error = None
        try:
            # Everything that can be checked without the others' inputs (the option values
            # included), before any collective.
            _C.check_inputs(student, teacher, labels, *options.check_args)
            check_logit_transform(**options.transform_kwargs)
        except (ValueError, TypeError, RuntimeError) as e:
            local_error = e
        width = student.shape[-1] if student.dim() else 0
        sl = exchange_metadata(
            "kdfused.kd_loss", group, student.device, rows, width, student, teacher, labels,
            options, local_error=local_error,
        )  # fmt: skip
        loss, *grads, ent = slice_loss(
            student, teacher, labels, sl, group, options, reduction, need_s, need_t, entropy
        )
        ctx.set_materialize_grads(False)
        keep(ctx, (need_s, need_t), tuple(grads))
        return with_entropy(ctx, loss, ent if entropy else None)

    @staticmethod
    def backward(ctx, grad_loss, *_entropy):
        return backward(ctx, grad_loss, 6, "kd_loss")


@torch.compiler.disable
def vocab_parallel_kd_loss(
    student_logits, teacher_logits, labels, process_group, options, entropy=False
):
    """:func:`kdfused.kd_loss` with ``process_group`` (arguments already type-checked; the
    option values are checked here, with the tensors).

    Runs eagerly: under ``torch.compile`` this call is a graph break (``fullgraph=True`` raises),
    because the exchange between the kernel steps is a host-side sequence of collectives.

    Devices: CPU tensors (gloo): tested. CUDA tensors (nccl): compiled, not run on a GPU yet (the
    kd_vp_* CUDA ops are csrc/cuda/kd_vocab_parallel_cuda.cu; the metadata and the records are
    created on the logits' device, and the gathers work with nccl). Other devices raise
    ``NotImplementedError``.
    """
    if student_logits.device.type not in ("cpu", "cuda"):
        raise NotImplementedError(
            "kdfused.kd_loss: process_group is implemented for CPU (gloo) and CUDA (nccl) tensors "
            f"only, got {student_logits.device.type}"
        )
    return _VocabParallelKD.apply(
        student_logits, teacher_logits, labels, process_group, options, entropy
    )
