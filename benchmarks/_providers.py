"""Loss providers compared by the benchmarks.

Every provider computes the same combined distillation loss on logits ``s`` (student, N x V, the
only input that requires grad), ``t`` (teacher, N x V) and integer labels ``y`` (N):

    loss = SOFT_WEIGHT * T^2 * D(softmax(t/T) || softmax(s/T)) + HARD_WEIGHT * CE(s, y)

averaged over the N rows ("batchmean"), with T = TEMPERATURE and D the divergence chosen with
``configure()`` (``--divergence``; default "kl"; "jsd" with ``--beta``). ``make(name, device)``
returns a closure ``fn(s, t, y) -> scalar loss``; the caller times ``fn`` under
``torch.no_grad()`` (forward) and ``fn(...).backward()`` (forward + backward). A provider that
cannot run here raises :class:`Unavailable` with the reason, so that it is reported rather than
dropped.
"""

from __future__ import annotations

import math
import os
import sys
from typing import Callable

import torch
import torch.nn.functional as F

TEMPERATURE = 2.0
SOFT_WEIGHT = 0.5
HARD_WEIGHT = 0.5
DIVERGENCE = "kl"
BETA = 0.5
DIVERGENCES = ("kl", "ce", "reverse_kl", "jsd", "tvd")


def configure(divergence: str = "kl", beta: float = 0.5) -> None:
    """Sets the divergence every provider computes (the worker calls it from the case spec)."""
    global DIVERGENCE, BETA
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
    DIVERGENCE, BETA = divergence, float(beta)


LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

DESCRIPTIONS = {
    "kdfused": "kdfused.kd_loss (fused loss + gradient)",
    "eager": "F.kl_div(log_softmax, log_softmax, log_target=True) (or the chosen divergence's "
    "formula) + F.cross_entropy, eager",
    "compile": "the same eager code under torch.compile (default options)",
    "liger_kl": "Liger LigerKLDIVLoss on torch log_softmax outputs + F.cross_entropy (CUDA only)",
    "liger_jsd": "Liger LigerJSD (beta 0 = forward KL, 1 = reverse KL, or --beta for jsd) on "
    "torch log_softmax outputs + F.cross_entropy (CUDA only)",
    "reference": "kdfused.reference.kd_loss (pure-PyTorch specification; not a peer)",
}
DEFAULT_PROVIDERS = ("kdfused", "eager", "compile")
CUDA_PROVIDERS = ("liger_kl", "liger_jsd")


class Unavailable(RuntimeError):
    """The provider cannot run on this machine (missing package, wrong device)."""


def people_loss(
    s: torch.Tensor,
    t: torch.Tensor,
    y: torch.Tensor,
    T: float = TEMPERATURE,
    soft_weight: float = SOFT_WEIGHT,
    hard_weight: float = HARD_WEIGHT,
) -> torch.Tensor:
    """The distillation loss as people write it today in plain PyTorch (for "jsd", as TRL's
    ``generalized_jsd_loss`` writes the mixture: a logsumexp of the two log-distributions)."""
    log_q = F.log_softmax(s / T, dim=-1)
    log_p = F.log_softmax(t / T, dim=-1)
    n = s.shape[0]
    if DIVERGENCE == "kl":
        d = F.kl_div(log_q, log_p, log_target=True, reduction="batchmean")
    elif DIVERGENCE == "ce":
        d = -(log_p.exp() * log_q).sum() / n
    elif DIVERGENCE == "reverse_kl":
        d = F.kl_div(log_p, log_q, log_target=True, reduction="batchmean")
    elif DIVERGENCE == "jsd":
        b = BETA
        log_m = torch.logsumexp(torch.stack([log_q + math.log(1 - b), log_p + math.log(b)]), 0)
        d = b * F.kl_div(log_m, log_p, log_target=True, reduction="batchmean") + (1 - b) * F.kl_div(
            log_m, log_q, log_target=True, reduction="batchmean"
        )
    else:  # tvd
        d = 0.5 * (log_p.exp() - log_q.exp()).abs().sum() / n
    return soft_weight * T * T * d + hard_weight * F.cross_entropy(s, y)


def load_reference():
    """``kdfused.reference``: pure Python, importable whether or not the extension was built.
    (This checkout is a fallback at the end of sys.path, so an installed kdfused wins.)"""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if root not in sys.path:
        sys.path.append(root)
    from kdfused import reference

    return reference


def reference_loss(s: torch.Tensor, t: torch.Tensor, y: torch.Tensor, rows: int = 0) -> float:
    """The exact loss value, from ``kdfused.reference`` in row chunks (bounded extra memory).

    Accumulates in float32 (float64 for float64 inputs), as the reference does, and sums the
    chunks in float64. ``rows`` is the chunk height; by default about 4M elements a chunk.
    """
    ref = load_reference()
    n, v = s.shape
    rows = rows or max(1, (1 << 22) // v)
    total = 0.0
    with torch.no_grad():
        for i in range(0, n, rows):
            a, b = s[i : i + rows], t[i : i + rows]
            total += ref.kd_loss(
                a,
                b,
                y[i : i + rows],
                temperature=TEMPERATURE,
                soft_weight=SOFT_WEIGHT,
                hard_weight=HARD_WEIGHT,
                divergence=DIVERGENCE,
                beta=BETA,
                reduction="sum",
            ).item()
    return total / n


def _configured(kd_loss) -> LossFn:
    """``kd_loss`` (kdfused's or the reference's) with this run's loss options."""

    def fn(s, t, y):
        return kd_loss(
            s,
            t,
            y,
            temperature=TEMPERATURE,
            soft_weight=SOFT_WEIGHT,
            hard_weight=HARD_WEIGHT,
            divergence=DIVERGENCE,
            beta=BETA,
        )

    return fn


def _kdfused(device: str) -> LossFn:
    try:
        import kdfused
    except Exception as exc:  # noqa: BLE001 - any import failure means "not built"
        raise Unavailable(f"import kdfused failed: {exc}") from exc
    if not hasattr(kdfused, "kd_loss"):
        raise Unavailable("kdfused.kd_loss not found (extension not built/installed?)")

    return _configured(kdfused.kd_loss)


def _eager(device: str) -> LossFn:
    return people_loss


def _compile(device: str) -> LossFn:
    # A fresh Dynamo cache for every case: each shape gets its own static-shape graph (the
    # default for a first call) and the recompile limit never silently falls back to eager.
    torch._dynamo.reset()
    return torch.compile(people_loss)


def _liger(device: str, which: str) -> LossFn:
    if device != "cuda":
        raise Unavailable("Liger-Kernel runs on CUDA (Triton) only")
    try:
        from liger_kernel.transformers import LigerJSD, LigerKLDIVLoss
    except Exception as exc:  # noqa: BLE001
        raise Unavailable(f"liger_kernel not importable: {exc}") from exc
    T = TEMPERATURE
    if which == "kl":
        if DIVERGENCE != "kl":
            raise Unavailable("liger_kl computes forward KL only")
        div = LigerKLDIVLoss(reduction="batchmean", log_target=True)
    else:
        # Liger's generalised JSD: beta = 0 is forward KL(p_teacher || q_student), 1 reverse KL.
        beta = {"kl": 0.0, "reverse_kl": 1.0, "jsd": BETA}.get(DIVERGENCE)
        if beta is None:
            raise Unavailable(f"Liger's JSD cannot express {DIVERGENCE!r}")
        div = LigerJSD(beta=beta)

    # Liger takes log-probabilities, so the log_softmax it needs is part of its cost.
    # The hard-label term stays F.cross_entropy: LigerCrossEntropyLoss overwrites its input
    # with the gradient, which would corrupt the student logits shared with the KL term.
    def fn(s, t, y):
        log_q = F.log_softmax(s / T, dim=-1)
        log_p = F.log_softmax(t / T, dim=-1)
        return SOFT_WEIGHT * T * T * div(log_q, log_p) + HARD_WEIGHT * F.cross_entropy(s, y)

    return fn


def _reference(device: str) -> LossFn:
    ref = load_reference()

    return _configured(ref.kd_loss)


_FACTORIES = {
    "kdfused": _kdfused,
    "eager": _eager,
    "compile": _compile,
    "liger_kl": lambda device: _liger(device, "kl"),
    "liger_jsd": lambda device: _liger(device, "jsd"),
    "reference": _reference,
}
ALL_PROVIDERS = tuple(_FACTORIES)


def make(name: str, device: str) -> LossFn:
    """The loss closure of provider ``name`` on ``device``; raises :class:`Unavailable`."""
    if name not in _FACTORIES:
        raise ValueError(f"unknown provider {name!r}; choose from {', '.join(ALL_PROVIDERS)}")
    return _FACTORIES[name](device)


def default_providers(device: str) -> list[str]:
    """Providers run when ``--providers`` is not given: Liger's too on CUDA."""
    return list(DEFAULT_PROVIDERS) + (list(CUDA_PROVIDERS) if device == "cuda" else [])
