"""Vocabulary-parallel :func:`kdfused.linear_kd_loss` (``process_group=``).

Each process holds the rows of the lm-head weight (and bias) for its contiguous slice of the
vocabulary, in group-rank order; the hidden states and labels are replicated. Per chunk of rows:
the slice's logits by one GEMM each (student, teacher), the vocabulary-parallel steps of
``kdfused.parallel`` (one ``all_gather`` of 10 floats per row, plus one of 3 for jsd / tvd), then
``grad_weight += g^T h`` and this slice's part of ``grad_hidden = g W``. At the end the hidden-state
gradient parts are gathered and summed in rank order, so every process returns the whole (and
bitwise the same) ``grad_hidden``. Extra memory: O(chunk x slice width), plus the gathered hidden
gradient parts (group size x N x H).
"""

from __future__ import annotations

import torch

from . import _C
from ._backward import backward, with_entropy
from ._checks import check_logit_transform
from ._options import KDOptions
from .parallel import exchange_metadata, gather, slice_loss


def _run(args, row_weight, need_h, need_w, need_b, entropy=False):
    """The linear op's own chunk loop (``_C.linear_chunk_loop``: the GEMMs, the row weights, the
    gradient sums and their 16-bit accumulation, the chunks whose rows are all ignored skipped,
    the same on every process since the labels are), with this slice's steps as the loss of each
    chunk. row_weight: [N] factors applied to each row's logit gradient in double (the mean's
    1 / n_valid, or the backward's grad_output for reduction "none"); None: loss only. Returns
    (row losses, grad_hidden, grad_weight, grad_bias, entropy or None)."""
    (sh, sw, sb, th, tw, tb, tl, labels, group, sl, options, chunk) = args
    grads = row_weight is not None

    def step(s_c, t_c, y_c, grad):
        loss_c, g, _, _, ent_c = slice_loss(
            s_c, t_c, y_c, sl, group, options, "none", grad, False, entropy
        )
        return loss_c, g, ent_c

    rows, gh, gw, gb, ent = _C.linear_chunk_loop(
        sh,
        sw,
        sb,
        th,
        tw,
        tb,
        tl,
        labels,
        row_weight.reshape(sh.shape[:-1]) if grads else None,
        *options.op_args,
        entropy,
        chunk,
        grads and need_h,
        grads and need_w,
        grads and need_b,
        step,
    )
    if gh is not None:
        # The whole hidden-state gradient: every slice's part, summed in rank order (the same
        # operations on the same data everywhere: bitwise identical on every process).
        parts = gather(gh.reshape(-1, sh.shape[-1]), group, sl.world)
        gh = parts[0].clone()
        for k in range(1, sl.world):
            gh += parts[k]
        gh = gh.reshape(sh.shape)
    return rows.reshape(-1), gh, gw, gb, ent


class _VocabParallelLinearKD(torch.autograd.Function):
    @staticmethod
    def forward(ctx, sh, sw, sb, th, tw, tb, tl, labels, group, options: KDOptions, chunk, entropy):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = sb is not None and ctx.needs_input_grad[2]
        H = sh.shape[-1]
        N = sh.numel() // H if H else 0
        ignore_index, reduction = options.ignore_index, options.reduction
        local_error = None
        try:
            # The single-process op's checks on this process's tensors (shapes, dtypes, options),
            # with zero rows: nothing is computed.
            _C_check(sh, sw, sb, th, tw, tb, tl, labels, options, chunk)
            check_logit_transform(**options.transform_kwargs)
        except (ValueError, TypeError, RuntimeError) as e:
            local_error = e
        teacher = th if th is not None else tl
        sl = exchange_metadata(
            "kdfused.linear_kd_loss",
            group,
            sh.device,
            N,
            sw.shape[0] if sw.dim() == 2 else 0,
            sh,
            teacher,
            labels,
            options,
            hidden=H,
            local_error=local_error,
            extra=(chunk,),
        )
        y = labels.reshape(-1) if labels is not None else None
        n_valid = int((y != ignore_index).sum()) if y is not None else N
        if chunk == 0:
            # From the whole vocabulary, so that every process has the same chunks (each chunk
            # is a collective).
            chunk = _C.auto_chunk_rows(N, sl.total, sh.element_size())
        args = (sh, sw, sb, th, tw, tb, tl, labels, group, sl, options, chunk)
        any_grad = need_h or need_w or need_b
        none = reduction == "none"
        weight = None
        if any_grad and not none:
            scale = 1.0 / max(n_valid, 1) if reduction in ("mean", "batchmean") else 1.0
            weight = torch.full((N,), scale, dtype=torch.float64, device=sh.device)
        rows, gh, gw, gb, ent = _run(args, weight, need_h, need_w, need_b, entropy)
        ctx.kd_need = (need_h, need_w, need_b)
        ctx.set_materialize_grads(False)
        if none:
            ctx.kd_args = args  # the backward runs the loop again with row_weight = grad_output
            ctx.kd_recompute = _rerun
            loss = rows.reshape(sh.shape[:-1])
        else:
            ctx.kd_grads = (gh, gw, gb)
            ctx.kd_recompute = _scaled
            total = rows.to(torch.float64).sum()  # row order, in double: the same everywhere
            if reduction in ("mean", "batchmean"):
                total = total / max(n_valid, 1)
            loss = total.to(rows.dtype)
        return with_entropy(ctx, loss, ent if entropy else None)

    @staticmethod
    def backward(ctx, grad_loss, *_entropy):
        return backward(ctx, grad_loss, 12, "linear_kd_loss")


def _rerun(ctx, grad_loss):
    """Reduction "none": the chunk loop again, each row's gradient weighted by its grad_output."""
    return _run(ctx.kd_args, grad_loss.reshape(-1).to(torch.float64), *ctx.kd_need)[1:4]


def _scaled(ctx, grad_loss):
    """The gradients of the forward, scaled to grad_output in double (out of place)."""
    grads = ctx.kd_grads
    g = grad_loss.to(torch.float64)
    if not bool(g == 1):  # (one sync on CUDA, where the collectives synchronise anyway)
        grads = tuple(None if x is None else (x.to(torch.float64) * g).to(x.dtype) for x in grads)
    return grads


def _C_check(sh, sw, sb, th, tw, tb, tl, labels, options: KDOptions, chunk):
    # The single-process op checks everything local (shapes, dtypes, devices, options, chunk_size)
    # before it computes anything; run it on zero rows of the inputs.
    def rows0(x):
        return None if x is None else x.reshape(-1, x.shape[-1])[:0]

    torch.ops.kdfused.kd_linear_loss(
        rows0(sh) if sh.dim() >= 1 else sh,
        sw,
        sb,
        rows0(th),
        tw,
        tb,
        rows0(tl),
        None if labels is None else labels.reshape(-1)[:0],
        None,
        *options.op_args,
        False,
        chunk,
        False,
        False,
        False,
    )


@torch.compiler.disable
def vocab_parallel_linear_kd_loss(
    sh, sw, th, tw, labels, sb, tb, tl, group, options, chunk, entropy=False
):
    """:func:`kdfused.linear_kd_loss` with ``process_group`` (arguments already type-checked).
    Runs eagerly: under ``torch.compile`` a graph break (``fullgraph=True`` raises)."""
    if sh.device.type not in ("cpu", "cuda"):
        raise NotImplementedError(
            f"kdfused.linear_kd_loss: process_group is implemented for CPU (gloo) and CUDA "
            f"(nccl) tensors, got {sh.device.type}"
        )
    for name, t in (("teacher_hidden", th), ("teacher_weight", tw), ("teacher_bias", tb)):
        if t is not None and t.requires_grad and torch.is_grad_enabled():
            raise ValueError(f"kdfused.linear_kd_loss: {name} requires grad; pass {name}.detach()")
    return _VocabParallelLinearKD.apply(
        sh, sw, sb, th, tw, tb, tl, labels, group, options, chunk, entropy
    )
