"""kdfused: a fused knowledge-distillation loss for PyTorch.

    loss = kdfused.kd_loss(student_logits, teacher_logits, labels, temperature=4.0,
                           soft_weight=0.9, hard_weight=0.1)

``kdfused.reference`` holds a pure-PyTorch implementation of the same semantics.
"""

from . import reference
from ._C import build_info, empty_cache
from .linear import LinearKDLoss, linear_kd_loss
from .loss import KDLoss, kd_loss

__all__ = ["kd_loss", "KDLoss", "linear_kd_loss", "LinearKDLoss", "reference", "build_info",
           "empty_cache"]
__version__ = "0.1.0"
