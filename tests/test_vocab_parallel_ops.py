"""The kd_vp_* ops in one process, on every device: a process group emulated by slicing the
vocabulary (uneven slices, in rank order), running each step per slice and stacking the records
where parallel.py would ``all_gather`` them. The loss and the concatenated slice gradients must
match the single-process ``kd_loss`` op on the whole rows (same device).

On "cpu" this checks the CPU steps (and the emulation itself); on "cuda" the CUDA steps of
csrc/cuda/kd_vocab_parallel_cuda.cu, plus bitwise reproducibility and agreement of the records with
the CPU steps. The real process groups (gloo) are tests/test_vocab_parallel.py.
"""

from __future__ import annotations

import pytest
import torch

from kdfused._ops import _lib_ops as ops  # loads the library (torch.ops.kdfused)

from conftest import DEVICES

pytestmark = pytest.mark.fused_only

# (name, V, slice widths, divergence, beta, T, soft, hard, reduction, dtypes, grads, extra)
CASES = [
    ("kl-mean", 37, [10, 20, 7], "kl", 0.5, 2.0, 1.0, 0.5, "mean", ("f32", "f32"), (1, 0), ""),
    ("ce-sum", 300, [1, 299], "ce", 0.5, 1.0, 1.0, 0.0, "sum", ("f32", "f32"), (1, 1), ""),
    (
        "rkl-none",
        600,
        [256, 87, 257],
        "reverse_kl",
        0.5,
        0.5,
        0.7,
        0.3,
        "none",
        ("f32", "f32"),
        (1, 1),
        "",
    ),
    (
        "jsd-mean",
        1000,
        [333, 333, 334],
        "jsd",
        0.3,
        2.0,
        1.0,
        0.2,
        "mean",
        ("f32", "f32"),
        (1, 1),
        "",
    ),
    ("tvd-sum", 500, [100, 400], "tvd", 0.5, 1.5, 1.0, 0.0, "sum", ("f32", "f32"), (1, 1), ""),
    ("kl-bf16", 2048, [1000, 1048], "kl", 0.5, 2.0, 1.0, 0.5, "mean", ("bf16", "bf16"), (1, 1), ""),
    ("jsd-f16-f32", 700, [350, 350], "jsd", 0.5, 1.0, 1.0, 0.0, "mean", ("f16", "f32"), (1, 1), ""),
    ("kl-f16-bf16", 300, [150, 150], "kl", 0.5, 1.0, 1.0, 0.5, "sum", ("f16", "bf16"), (1, 1), ""),
    ("ce-f64", 5000, [2000, 1, 2999], "ce", 0.5, 3.0, 1.0, 1.0, "mean", ("f64", "f64"), (1, 1), ""),
    ("hard-only", 100, [40, 60], "kl", 0.5, 1.0, 0.0, 1.0, "mean", ("f32", "f32"), (1, 1), ""),
    (
        "masked-slice",
        64,
        [32, 32],
        "kl",
        0.5,
        1.0,
        1.0,
        0.5,
        "mean",
        ("f32", "f32"),
        (1, 1),
        "mask",
    ),
    (
        "strided-rows",
        96,
        [50, 46],
        "tvd",
        0.5,
        2.0,
        1.0,
        0.5,
        "mean",
        ("f32", "f32"),
        (1, 1),
        "strided",
    ),
    (
        "no-labels",
        80,
        [30, 50],
        "jsd",
        0.6,
        1.0,
        1.0,
        0.0,
        "sum",
        ("f32", "f32"),
        (1, 0),
        "nolabels",
    ),
]

_DT = {"f16": torch.float16, "bf16": torch.bfloat16, "f32": torch.float32, "f64": torch.float64}


def _tol(s_dtype, t_dtype):
    if torch.float64 in (s_dtype, t_dtype) and s_dtype != t_dtype:
        return 1e-4
    if s_dtype == torch.float64:
        return 1e-9
    if s_dtype in (torch.float16, torch.bfloat16) or t_dtype in (torch.float16, torch.bfloat16):
        return 2e-2
    return 2e-4


def _inputs(case, device, seed):
    name, V, widths, div, beta, T, sw, hw, red, (sd, td), grads, extra = case
    g = torch.Generator().manual_seed(seed)
    rows = 6
    s = torch.randn(rows, V + (1 if extra == "strided" else 0), generator=g) * 3
    t = torch.randn(rows, V + (1 if extra == "strided" else 0), generator=g) * 3 + 1
    if extra == "strided":
        s, t = s[:, :-1], t[:, :-1]  # rows of stride V + 1
    if extra == "mask":
        s[1, :32] = float("-inf")  # an all -inf slice of a row (its state is empty)
        t[1, :32] = float("-inf")
    labels = torch.randint(0, V, (rows,), generator=g)
    labels[2] = -100  # an ignored row
    if extra == "mask":
        labels[1] = 40  # the label in the live slice
    if extra == "nolabels":
        labels = None
    s = s.to(device=device, dtype=_DT[sd])
    t = t.to(device=device, dtype=_DT[td])
    if labels is not None:
        labels = labels.to(device)
    return s, t, labels


def _emulate(s, t, labels, widths, opts, red, grads):
    """parallel.slice_loss for every rank of a group, the collectives replaced by stacking."""
    V = sum(widths)
    offs = [sum(widths[:k]) for k in range(len(widths))]
    sl = [(s[..., o : o + w], t[..., o : o + w], o) for o, w in zip(offs, widths)]
    stats = torch.stack(
        [ops.kd_vp_stats(a, b, labels, o, V, *opts, -100, (), False) for a, b, o in sl]
    )
    fin = ops.kd_vp_merge(stats, labels, *opts, -100, red, (), False)
    div, beta = opts[3], opts[4]
    if opts[1] > 0 and div in ("jsd", "tvd") and beta not in (0.0, 1.0):
        mix = torch.stack([ops.kd_vp_mix(a, b, labels, fin, o, *opts, -100, ()) for a, b, o in sl])
        fin = ops.kd_vp_merge_mix(fin, mix, *opts)
    outs = [ops.kd_vp_grad(a, b, labels, fin, o, *opts, -100, red, (), *grads) for a, b, o in sl]
    for o in outs[1:]:
        assert torch.equal(o[0], outs[0][0]), "the loss differs between ranks"
    gs = torch.cat([o[1] for o in outs], -1) if grads[0] else None
    gt = torch.cat([o[2] for o in outs], -1) if grads[1] else None
    return outs[0][0], gs, gt, stats, fin


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_vp_ops_match_kd_loss(case, device, seed):
    name, V, widths, div, beta, T, sw, hw, red, dtypes, grads, extra = case
    s, t, labels = _inputs(case, device, seed)
    opts = (float(T), float(sw), float(hw), div, float(beta))
    grads = (bool(grads[0]), bool(grads[1]))
    loss, gs, gt, stats, fin = _emulate(s, t, labels, widths, opts, red, grads)
    ref = ops.kd_loss(s, t, labels, *opts, -100, red, (), False, *grads)
    tol = _tol(s.dtype, t.dtype)
    torch.testing.assert_close(loss.double(), ref[0].double(), rtol=tol, atol=tol)
    for got, want in ((gs, ref[1]), (gt, ref[2])):
        if got is None:
            continue
        assert got.dtype == want.dtype and got.shape == want.shape
        scale = max(1.0, float(want.double().abs().max()))
        torch.testing.assert_close(got.double(), want.double(), rtol=tol, atol=tol * scale)
    if labels is not None:
        ignored = labels == -100
        for got in (gs, gt):
            if got is not None:
                assert torch.all(got[ignored] == 0)

    if device == "cuda":
        # Bitwise reproducible on the device.
        again = _emulate(s, t, labels, widths, opts, red, grads)
        assert torch.equal(loss, again[0]) and torch.equal(fin, again[4])
        for a, b in ((gs, again[1]), (gt, again[2])):
            assert a is None or torch.equal(a, b)
        # The records agree with the CPU steps' (different summation orders and exps).
        cpu = _emulate(
            s.cpu(), t.cpu(), None if labels is None else labels.cpu(), widths, opts, red, grads
        )
        torch.testing.assert_close(fin.cpu(), cpu[4], rtol=tol, atol=tol, equal_nan=True)
        torch.testing.assert_close(loss.cpu(), cpu[0], rtol=tol, atol=tol)
