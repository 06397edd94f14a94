"""kdfused: a fused knowledge-distillation loss for PyTorch.

    loss = kdfused.kd_loss(student_logits, teacher_logits, labels, temperature=4.0,
                           soft_weight=0.9, hard_weight=0.1)

``kdfused.reference`` holds a pure-PyTorch implementation of the same semantics; it needs no
compiled extension. The fused op (``kd_loss``, ``KDLoss``, ``KDLossFunction``, ``build_info``,
``empty_cache``) loads the extension ``kdfused._C`` on first use, so that ``import kdfused`` and
``import kdfused.reference`` work where the extension was never built. Before it is loaded, the
torch it was built against is compared with the running one (``kdfused._extension``): a mismatch
raises ImportError saying how to rebuild.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import reference
from ._extension import build_info, install_import_check
from ._version import __version__  # noqa: F401  (the one place it is written)

__all__ = [
    "kd_loss",
    "KDLoss",
    "KDLossFunction",
    "reference",
    "build_info",
    "empty_cache",
    "topk_kd_loss",
    "TopKKDLoss",
    "topk_teacher",
    "linear_kd_loss",
    "LinearKDLoss",
    "linear_topk_kd_loss",
    "LinearTopKKDLoss",
]

install_import_check()

# name -> module that defines it; imported on first attribute access (PEP 562)
_LAZY = {
    "kd_loss": "loss",
    "KDLoss": "loss",
    "KDLossFunction": "loss",
    "empty_cache": "_C",
    "topk_kd_loss": "topk",
    "TopKKDLoss": "topk",
    "topk_teacher": "topk",
    "linear_kd_loss": "linear",
    "LinearKDLoss": "linear",
    "linear_topk_kd_loss": "linear_topk",
    "LinearTopKKDLoss": "linear_topk",
}

if TYPE_CHECKING:  # for type checkers and IDEs; at run time the names load lazily
    from ._C import empty_cache  # noqa: F401
    from .linear import LinearKDLoss, linear_kd_loss  # noqa: F401
    from .linear_topk import LinearTopKKDLoss, linear_topk_kd_loss  # noqa: F401
    from .loss import KDLoss, KDLossFunction, kd_loss  # noqa: F401
    from .topk import TopKKDLoss, topk_kd_loss, topk_teacher  # noqa: F401


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value  # later lookups skip __getattr__
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
