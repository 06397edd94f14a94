"""TRL 1.16's DistillationTrainer loss (``_chunked_divergence_loss``), computed by kdfused.

    from kdfused.integrations.trl import chunked_divergence_loss

    loss, entropy_sum, n_valid = chunked_divergence_loss(
        student_hidden, teacher_hidden,          # (B, K, H), (B, K, H_t): before the lm_heads
        student_lm_head.weight, teacher_lm_head.weight,    # (V, H), (V, H_t)
        completion_mask,                         # (B, K): nonzero marks the tokens in the loss
        beta=0.5, num_items_in_batch=None,
        student_lm_head_bias=None, teacher_lm_head_bias=None,
        student_logit_scale=1.0, teacher_logit_scale=1.0,
        student_final_logit_softcapping=None, teacher_final_logit_softcapping=None,
        temperature=1.0)
    loss.backward()     # gradients of the student's hidden states, weight (and bias)

    # or train with TRL's DistillationTrainer, its loss computed by kdfused (needs trl installed):
    from kdfused.integrations.trl import DistillationTrainer     # a subclass of trl's
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=config,
                                  train_dataset=dataset, processing_class=tokenizer)
    trainer.train()

    # or make every TRL DistillationTrainer use it, from now on (needs trl installed):
    from kdfused.integrations.trl import patch_distillation_trainer
    patch_distillation_trainer()

Same arguments, same return values and same gradients as
``trl.trainer.distillation_trainer._chunked_divergence_loss`` (TRL 1.16.0). TRL itself is not
needed, except by ``DistillationTrainer`` and ``patch_distillation_trainer``.

TRL's loss, which this reproduces (``trl/trainer/distillation_trainer.py`` and
``trl/kernels/chunked_divergence.py``). Per token, each side's logits are ``x = h W^T + b``
transformed as ``z = scale * x``, then, with a softcap ``c``, ``z = c tanh(z / c)``; with ``T``
the temperature, ``p = softmax(z_teacher / T)`` and ``q = softmax(z_student / T)``:

    D = beta KL(p || m) + (1 - beta) KL(q || m),    m = beta p + (1 - beta) q
    loss        = sum_valid D / num_items_in_batch          (num_items_in_batch given)
                = sum_valid D / max(n_valid, 1)             (num_items_in_batch None)
    entropy_sum = sum_valid -sum_v q_v log q_v              (no gradient)
    n_valid     = number of nonzero entries of completion_mask (an int64 tensor)

- beta = 0 is KL(teacher || student), beta = 1 is KL(student || teacher): kdfused's
  ``divergence="jsd"`` with the same ``beta``, ends included;
- no T^2 factor (kdfused multiplies the soft term by T^2, so it is given
  ``soft_weight = 1 / T^2``); the temperature divides the transformed logits;
- the entropy is the student's, of the tempered, transformed distribution ``q``, summed over the
  valid tokens;
- masked tokens count nowhere and get zero gradients; with no valid token and
  ``num_items_in_batch=None`` the loss is 0;
- the gradients flow to the student's hidden states, weight and bias; the teacher gets none
  (TRL's autograd function returns none for it, whether or not its tensors require grad).

TRL's trainer reads each model's scale and softcap from its config (``logit_scale``,
``logits_scaling``, ``final_logit_softcapping``, ...);
:func:`kdfused.integrations.transformers.logit_transform` reads them the same way.

So the whole loss is one call of :func:`kdfused.linear_kd_loss`: the mask becomes labels (0 at
valid tokens, ``ignore_index`` elsewhere; with ``hard_weight=0`` their values are not used),
``reduction="mean"`` without ``num_items_in_batch`` and ``"sum"`` divided by it with it, and
``return_entropy=True`` for the entropy. One pass over the rows, with no N x V logits.

As in TRL: the dtype the projections run in is the autocast dtype when autocast is on for the
hidden states' device, else the hidden states' dtype (per side); an FSDP2 ``DTensor`` weight (and
bias) is gathered with ``full_tensor()`` once.

Differences from TRL, none of which changes a result beyond rounding:

- Accuracy: float64 inputs are computed in float64 and the loss and entropy sum are float64
  (TRL computes and returns float32 whatever the inputs); otherwise the loss is float32, as TRL's.
- A weight or bias whose dtype is not the compute dtype is cast once (one copy of it; TRL casts
  per vocabulary chunk, and adds its bias in float32).
- The masked tokens are skipped by their labels rather than selected out (TRL selects the valid
  rows on CUDA and masks them on the CPU): no host synchronisation and no copy of the hidden
  states. On the CPU chunks whose rows are all masked skip their GEMMs; on CUDA every chunk runs
  them.
- ``chunk_size`` (keyword only, an addition) is the number of rows per chunk passed to kdfused;
  the default ``None`` lets kdfused choose.
- Arguments kdfused rejects raise ValueError before any computation: a temperature that is not
  finite and > 0, a beta outside [0, 1], a softcap that is not > 0 (TRL reads a softcap of 0 as
  1), a mask whose size is not the number of rows.
"""

from __future__ import annotations

import math
import sys
from typing import Callable, Optional, Union

import torch

from . import layer_loss as _layer_loss
from . import require

# DistillationTrainer (module __getattr__ below) is left out of __all__: a star import must work
# without trl installed.
__all__ = ["chunked_divergence_loss", "patch_distillation_trainer"]

TRL_VERSION = "1.16.0"  # the TRL release whose semantics this module reproduces

_IGNORE = -100
_TRAINER_MODULE = "trl.trainer.distillation_trainer"
_ORIGINAL: Optional[Callable] = None  # TRL's own function, once patch_distillation_trainer ran


def _gathered(weight, bias, dtype):
    """An FSDP2 DTensor head as plain tensors (one all-gather), as TRL does."""
    # Not imported here: a DTensor exists only once its module is loaded, and importing it costs
    # about 40 MiB of memory and 0.2 s in a process that has no use for it.
    dtensor = sys.modules.get("torch.distributed.tensor")
    if dtensor is not None:
        if isinstance(weight, dtensor.DTensor):
            weight = weight.full_tensor().to(dtype)
            if bias is not None:
                bias = bias.full_tensor()
    return weight, bias


def _compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return hidden.dtype


def _side(hidden, weight, bias, teacher: bool):
    weight, bias = _gathered(weight, bias, hidden.dtype)
    dtype = _compute_dtype(hidden)
    hidden = hidden.reshape(-1, hidden.size(-1)).to(dtype)
    weight = weight.to(dtype)
    bias = bias.to(dtype) if bias is not None else None
    if teacher:
        hidden, weight = hidden.detach(), weight.detach()
        bias = bias.detach() if bias is not None else None
    return hidden, weight, bias


def _soft_weight(temperature: float) -> float:
    t = float(temperature)
    if not (math.isfinite(t) and t > 0):
        raise ValueError(f"temperature must be finite and > 0, got {temperature}")
    w = 1.0 / (t * t) if t * t > 0 else math.inf
    if not math.isfinite(w):
        raise ValueError(f"temperature {temperature} is too small: 1 / T^2 overflows")
    return w


def chunked_divergence_loss(
    student_hidden_states: torch.Tensor,
    teacher_hidden_states: torch.Tensor,
    student_lm_head_weight: torch.Tensor,
    teacher_lm_head_weight: torch.Tensor,
    completion_mask: torch.Tensor,
    beta: float,
    num_items_in_batch: Union[torch.Tensor, int, None] = None,
    student_lm_head_bias: Optional[torch.Tensor] = None,
    teacher_lm_head_bias: Optional[torch.Tensor] = None,
    student_logit_scale: float = 1.0,
    teacher_logit_scale: float = 1.0,
    student_final_logit_softcapping: Optional[float] = None,
    teacher_final_logit_softcapping: Optional[float] = None,
    temperature: float = 1.0,
    *,
    chunk_size: Optional[int] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """TRL 1.16's ``_chunked_divergence_loss``, computed by ``kdfused.linear_kd_loss``.

    Args (as TRL's):
        student_hidden_states: ``(B, K, H)`` (any leading shape), before the student's lm_head.
        teacher_hidden_states: ``(B, K, H_t)``, the same tokens; ``H_t`` may differ from ``H``.
        student_lm_head_weight, teacher_lm_head_weight: ``(V, H)``, ``(V, H_t)``.
        completion_mask: ``(B, K)``; nonzero marks the tokens included in the loss.
        beta: in [0, 1]; 0 is KL(teacher || student), 1 is KL(student || teacher), else the
            generalised JSD with mixture ``beta * teacher + (1 - beta) * student``.
        num_items_in_batch: when given (int or tensor), the loss is ``sum / num_items_in_batch``;
            when None, the mean over the valid tokens (0 when there is none).
        student_lm_head_bias, teacher_lm_head_bias: ``(V,)`` or None.
        student_logit_scale, teacher_logit_scale: multiply each side's logits first.
        student_final_logit_softcapping, teacher_final_logit_softcapping: None, or ``c`` for
            ``c * tanh(z / c)`` after the scale.
        temperature: divides both sides' transformed logits; no T^2 factor.
        chunk_size: (keyword only, not TRL's) rows per chunk, or None for kdfused's choice.

    Returns:
        ``(loss, entropy_sum, n_valid)``: the scalar loss; the sum over the valid tokens of the
        student's entropy (nats) of its tempered, transformed distribution, with no gradient;
        the number of valid tokens (int64 tensor on the mask's device).
    """
    soft_weight = _soft_weight(temperature)
    student = _side(
        student_hidden_states, student_lm_head_weight, student_lm_head_bias, teacher=False
    )
    teacher = _side(
        teacher_hidden_states, teacher_lm_head_weight, teacher_lm_head_bias, teacher=True
    )
    rows = student[0].shape[0]
    valid = completion_mask.reshape(-1) != 0
    if valid.numel() != rows:
        raise ValueError(
            f"completion_mask has {valid.numel()} elements but the hidden states have {rows} rows"
        )
    n_valid = valid.sum()
    labels = torch.where(valid, 0, _IGNORE).to(device=student[0].device, dtype=torch.int64)
    loss, entropy = _layer_loss(
        student,
        teacher,
        labels,
        temperature=float(temperature),
        soft_weight=soft_weight,
        hard_weight=0.0,
        divergence="jsd",
        beta=beta,
        ignore_index=_IGNORE,
        reduction="mean" if num_items_in_batch is None else "sum",
        student_logit_scale=float(student_logit_scale),
        teacher_logit_scale=float(teacher_logit_scale),
        student_softcap=student_final_logit_softcapping,
        teacher_softcap=teacher_final_logit_softcapping,
        return_entropy=True,
        chunk_size=chunk_size,
    )
    entropy_sum = entropy.sum(dtype=torch.float64).to(entropy.dtype)
    if num_items_in_batch is not None:
        if isinstance(num_items_in_batch, torch.Tensor):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
    return loss, entropy_sum, n_valid


def patch_distillation_trainer() -> Callable:
    """Makes TRL's ``DistillationTrainer`` compute its loss with :func:`chunked_divergence_loss`
    (replaces ``trl.trainer.distillation_trainer._chunked_divergence_loss``, which the trainer
    looks up at each call). Returns TRL's own function; put it back with
    ``trl.trainer.distillation_trainer._chunked_divergence_loss = <returned>``. Calling it again
    changes nothing. Needs trl installed."""
    global _ORIGINAL
    module = require(_TRAINER_MODULE, "trl", TRL_VERSION, what="patch_distillation_trainer")
    current = module._chunked_divergence_loss
    if current is not chunked_divergence_loss:
        _ORIGINAL = current
        module._chunked_divergence_loss = chunked_divergence_loss
    return _ORIGINAL


def _make_distillation_trainer() -> type:
    module = require(_TRAINER_MODULE, "trl", TRL_VERSION, what="DistillationTrainer")

    class DistillationTrainer(module.DistillationTrainer):
        """TRL's ``DistillationTrainer`` (``trl.DistillationTrainer``, TRL 1.16) with its loss
        computed by kdfused's :func:`chunked_divergence_loss`; the same constructor, arguments and
        behaviour otherwise (on-policy generation by the student, the teacher's forward, the
        DDP / FSDP / DeepSpeed routing of ``compute_loss``, logging, checkpoints).

        How: TRL's ``_compute_loss`` (the student's and teacher's forwards, the lm_heads, the
        models' logit scales and softcaps, then the loss) calls the module-level function
        ``trl.trainer.distillation_trainer._chunked_divergence_loss``, which Python looks up in
        the module's globals at each call. This class's ``_compute_loss`` therefore binds that
        global to kdfused's function, runs TRL's own ``_compute_loss`` and puts back whatever was
        bound before, in a ``finally``. Nothing of TRL's code is copied, so what TRL computes
        around the loss stays TRL's; and other instances of TRL's own trainer keep TRL's loss
        (unlike ``patch_distillation_trainer``, which replaces it for all). Compatible with
        ``patch_distillation_trainer`` (then the binding changes nothing). The swap is
        process-wide while a step's loss runs, so training TRL's own trainer in another thread at
        the same moment would use kdfused's loss for that time.

        Needs trl installed (the version this module reproduces, 1.16.0); without it, accessing
        ``kdfused.integrations.trl.DistillationTrainer`` raises ImportError.
        """

        def _compute_loss(self, unwrapped_student, inputs, num_items_in_batch):
            previous = module._chunked_divergence_loss
            module._chunked_divergence_loss = chunked_divergence_loss
            try:
                return super()._compute_loss(unwrapped_student, inputs, num_items_in_batch)
            finally:
                module._chunked_divergence_loss = previous

    DistillationTrainer.__module__ = __name__
    DistillationTrainer.__qualname__ = "DistillationTrainer"
    return DistillationTrainer


def __getattr__(name: str):
    # DistillationTrainer subclasses trl's, so it is built on first access (trl imported then).
    if name == "DistillationTrainer":
        cls = _make_distillation_trainer()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | {"DistillationTrainer"})
