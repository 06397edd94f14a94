"""Inputs with -inf logits (a masked vocabulary, all -inf padding rows) and the checks on them
that tests/test_numerics.py and tests/test_divergences.py share."""

from __future__ import annotations

import torch

from oracle import make_labels, make_logits, random_mask

NEG_INF = float("-inf")


def masked_logits(N, V, dtype, device, gen, frac):
    """(mask, student, teacher): random (N, V) logits, -inf in both at the same random columns of
    each row (True in mask; at least one column per row is left)."""
    mask = random_mask(N, V, gen, frac, device)
    s = make_logits((N, V), dtype, device, gen).masked_fill(mask, NEG_INF)
    t = make_logits((N, V), dtype, device, gen).masked_fill(mask, NEG_INF)
    return mask, s, t


def labels_off_mask(labels, mask):
    """Each valid label on a masked column moved to the row's first unmasked one (a hard CE at a
    masked label would be +inf); ignored labels (< 0) kept."""
    at_masked = mask.gather(1, labels.clamp(min=0).unsqueeze(1)).squeeze(1) & (labels >= 0)
    return torch.where(at_masked, (~mask).int().argmax(1), labels)


def assert_masked_columns_clean(loss, gs, gt, mask):
    """Finite loss and gradients, both gradients exactly 0 at the masked columns."""
    assert torch.isfinite(loss).all()
    assert torch.isfinite(gs).all() and torch.isfinite(gt).all()
    assert (gs[mask] == 0).all(), "student gradient must be exactly 0 at masked columns"
    assert (gt[mask] == 0).all(), "teacher gradient must be exactly 0 at masked columns"


def all_inf_row(N, V, dtype, device, gen, row):
    """Random (N, V) student and teacher logits whose row `row` is -inf everywhere in both."""
    s = make_logits((N, V), dtype, device, gen)
    t = make_logits((N, V), dtype, device, gen)
    s[row] = NEG_INF
    t[row] = NEG_INF
    return s, t


def padding_row(N, V, dtype, device, gen, row):
    """all_inf_row's logits and labels, every label valid but that row's (-100): padding."""
    s, t = all_inf_row(N, V, dtype, device, gen, row)
    labels = make_labels((N,), V, device, gen, 0.0)
    labels[row] = -100
    return s, t, labels


def assert_padding_row_clean(loss, gs, gt, row):
    """No NaN in the loss or in any gradient, and exactly 0 gradient in the ignored row."""
    assert not torch.isnan(loss).any(), loss
    assert (gs[row] == 0).all() and (gt[row] == 0).all(), "ignored row must get exactly 0 gradient"
    assert not torch.isnan(gs).any() and not torch.isnan(gt).any()
