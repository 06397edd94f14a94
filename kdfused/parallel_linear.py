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
import torch.nn.functional as F

from ._backward import backward
from ._checks import check_logit_transform
from ._options import KDOptions
from .parallel import exchange_metadata, gather, slice_loss

# Rows per chunk when chunk_size is None: as the single-process op, from the logit row size; the
# same on every process (computed from the whole vocabulary), since each chunk is a collective.
_CHUNK_LOGIT_BYTES = 64 << 20


def _auto_chunk(total_vocab: int, dtype: torch.dtype) -> int:
    row = total_vocab * torch.empty((), dtype=dtype).element_size()
    rows = max(1, _CHUNK_LOGIT_BYTES // max(row, 1))
    return rows - rows % 16 if rows >= 64 else rows


def _linear(h, w, b):
    return F.linear(h, w, b)


def _run(args, row_weight, need_h, need_w, need_b, entropy=False):
    """The chunk loop. row_weight: [N] factors applied to each row's logit gradient (the mean's
    1 / n_valid, or the backward's grad_output for reduction "none"); None: loss only. Returns
    (row losses, grad_hidden, grad_weight, grad_bias, entropy or None)."""
    (sh, sw, sb, th, tw, tb, tl, labels, group, sl, options, chunk) = args
    ignore_index = options.ignore_index
    H = sh.shape[-1]
    N = sh.numel() // H if H else 0
    h = sh.reshape(N, H)
    ht = th.reshape(N, th.shape[-1]) if th is not None else None
    tlog = tl.reshape(N, tl.shape[-1]) if tl is not None else None
    y = labels.reshape(N).to(torch.int64) if labels is not None else None
    grads = row_weight is not None
    w_acc = torch.float32 if sw.dtype in (torch.float16, torch.bfloat16) else sw.dtype
    gh = torch.zeros_like(h) if grads and need_h else None
    gw = torch.zeros(sw.shape, dtype=w_acc, device=sw.device) if grads and need_w else None
    gb = torch.zeros(sb.shape, dtype=w_acc, device=sw.device) if grads and need_b else None
    acc = (
        torch.float64
        if torch.float64 in (sh.dtype, (th if th is not None else tl).dtype)
        else (torch.float32)
    )
    rows = torch.zeros(N, dtype=acc, device=sh.device)
    ent = torch.zeros(N, dtype=acc, device=sh.device) if entropy else None  # 0 at ignored rows
    # Which chunks are all ignored, decided on the host once (one copy of the labels on CUDA).
    y_host = y.cpu() if y is not None else None
    for a in range(0, N, chunk):
        b = min(N, a + chunk)
        y_c = y[a:b] if y is not None else None
        if y_host is not None and bool((y_host[a:b] == ignore_index).all()):
            continue  # the same on every process (labels are identical): no collective skipped
        s_c = _linear(h[a:b], sw, sb)
        t_c = _linear(ht[a:b], tw, tb) if ht is not None else tlog[a:b]
        loss_c, g, _, _, ent_c = slice_loss(
            s_c, t_c, y_c, sl, group, options, "none", grads, False, entropy
        )
        rows[a:b] = loss_c
        if entropy:
            ent[a:b] = ent_c
        if not grads:
            continue
        g = (g.to(torch.float64) * row_weight[a:b].unsqueeze(1)).to(g.dtype)
        if gh is not None:
            gh[a:b] = g @ sw
        if gw is not None or gb is not None:
            g_acc = g.to(w_acc)
            if gw is not None:
                gw.addmm_(g_acc.t(), h[a:b].to(w_acc))
            if gb is not None:
                gb.add_(g_acc.sum(0))
    if gh is not None:
        # The whole hidden-state gradient: every slice's part, summed in rank order (the same
        # operations on the same data everywhere: bitwise identical on every process).
        parts = gather(gh, group, sl.world)
        gh = parts[0].clone()
        for k in range(1, sl.world):
            gh += parts[k]
        gh = gh.reshape(sh.shape)
    return (
        rows,
        gh,
        gw.to(sw.dtype) if gw is not None else None,
        gb.to(sb.dtype) if gb is not None else None,
        ent.reshape(sh.shape[:-1]) if entropy else None,
    )


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
            chunk = _auto_chunk(sl.total, sh.dtype)
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
        if not entropy:
            return loss
        ctx.mark_non_differentiable(ent)
        return loss, ent

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
