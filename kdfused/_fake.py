"""What the ops' fake (meta) kernels share: the checks where shapes are concrete, and the shapes
of the outputs (a loss, one gradient per slot, a grad_scale)."""

from __future__ import annotations

from typing import Optional

import torch


def check_if_concrete(tensors, check, *args) -> None:
    """``check(*args)`` (the same check as the real kernel's, so that a compiled graph rejects
    what the op rejects, with the same error) where every shape is concrete; with symbolic shapes
    it runs when the compiled graph calls the real kernel."""
    if not any(isinstance(d, torch.SymInt) for x in tensors if x is not None for d in x.shape):
        check(*args)


def accumulation_dtype(*tensors: Optional[torch.Tensor]) -> torch.dtype:
    """float64 if any input is float64, else float32: the loss's dtype."""
    dtypes = [x.dtype for x in tensors if x is not None]
    return torch.float64 if torch.float64 in dtypes else torch.float32


def outputs(like: torch.Tensor, acc: torch.dtype, reduction: str, grads, entropy=None) -> tuple:
    """(loss, gradient per slot, grad_scale), then the entropy output when ``entropy`` is not
    None (True: the rows' shape, else empty). ``like``: the tensor whose leading dims are the
    rows; ``grads``: (tensor or None, asked for, tensor an empty placeholder is made like)."""
    loss = like.new_empty(like.shape[:-1] if reduction == "none" else (), dtype=acc)
    made = tuple(
        x.new_empty(x.shape) if wanted and x is not None else empty_like.new_empty((0,))
        for x, wanted, empty_like in grads
    )
    out = (loss, *made, torch.empty_like(loss))
    if entropy is None:
        return out
    return out + (like.new_empty(like.shape[:-1] if entropy else (0,), dtype=acc),)
