"""kdfused: a fused knowledge-distillation loss for PyTorch.

    loss = kdfused.kd_loss(student_logits, teacher_logits, labels, temperature=4.0,
                           soft_weight=0.9, hard_weight=0.1)

``kdfused.reference`` holds a pure-PyTorch implementation of the same semantics.
"""

from . import reference
from ._C import build_info, empty_cache
from .loss import KDLoss, kd_loss
from .topk import TopKKDLoss, topk_kd_loss, topk_teacher

__all__ = ["kd_loss", "KDLoss", "reference", "build_info", "empty_cache", "topk_kd_loss",
           "TopKKDLoss", "topk_teacher"]
__version__ = "0.1.0"
