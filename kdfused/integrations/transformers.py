"""Distillation inside the Hugging Face ``transformers.Trainer``: :class:`KDTrainer`.

    from kdfused.integrations.transformers import KDTrainer

    trainer = KDTrainer(student, teacher, TrainingArguments(...),
                        temperature=2.0, soft_weight=0.5, hard_weight=0.5, divergence="kl",
                        train_dataset=..., eval_dataset=..., data_collator=...)
    trainer.train()
    trainer.evaluate()          # eval_loss: the same loss

A ``transformers.Trainer`` for causal-LM distillation whose loss, per micro-batch, is ONE call of
:func:`kdfused.linear_kd_loss` on the two backbones' last hidden states and lm-head weights: the
N x V logits of neither model are ever made. The inputs are the usual ones: ``input_ids``,
``attention_mask`` (optional), ``labels`` aligned with ``input_ids`` (position ``t`` predicts
``labels[t + 1]``; -100 is ignored); a collator's ``shift_labels`` (already shifted) is used
as is. Per valid token, with ``T`` the temperature and ``p``, ``q`` the teacher's and student's
tempered distributions of their *transformed* logits:

    soft_weight * T^2 * D(p || q) + hard_weight * CE(student, label)      (D: ``divergence``)

summed over the valid tokens and divided by the Trainer's ``num_items_in_batch`` (the valid
tokens of the whole accumulated batch, over every process, which transformers counts when
training), else by the valid tokens of the micro-batch (at least 1). So gradient accumulation over
k micro-batches gives the update of one batch k times as large, whatever their token counts.

The transform of each model's logits is read from its config by :func:`logit_transform`, as TRL's
``DistillationTrainer`` reads it (Cohere's ``logit_scale``, Granite's ``logits_scaling``,
Gemma 2's ``final_logit_softcapping``, ...), and applied inside the kernel.

Details, as transformers 5.24's Trainer and TRL 1.16's DistillationTrainer do them:

- the student's backbone and the loss run inside the DDP / FSDP wrapper's forward (a forward
  redirection, TRL's ``_ForwardRedirection``), so DDP prepares its gradient reduction and FSDP
  keeps the lm-head's parameters gathered; an FSDP2 DTensor head is gathered once;
- mixed precision (``bf16`` / ``fp16``): the backbones and the loss run under the accelerator's
  autocast, so the loss is computed in its dtype (the student's gradients come back in the
  parameters' dtype);
- the teacher is prepared by the accelerator in evaluation mode (moved to the student's device,
  not wrapped in DDP), runs in eval mode under ``torch.no_grad()``;
- hidden states come from ``model.base_model`` (``model.model`` where that is the model
  itself); lm-head weight and bias from ``get_output_embeddings()``;
- with ``num_items_in_batch``, as for a model that takes loss kwargs: under DDP with
  ``average_tokens_across_devices`` (the default) the count is the global one and the loss is
  multiplied by the number of processes (DDP averages the gradients); the Trainer does not divide
  such a loss by the accumulation steps. Without it (evaluation) the loss is the micro-batch's mean
  and the Trainer divides it, when training, by the accumulation steps;
- ``trainer.evaluate()`` computes the same loss (``eval_loss``; no logits are returned).

Not supported: ``nn.DataParallel`` (several GPUs in one process: launch with ``torchrun`` /
``accelerate launch``), DeepSpeed, ``compute_loss_func`` / label smoothing (the loss is this
one). transformers is only needed for :class:`KDTrainer`: accessing it without transformers
raises ImportError naming the package; :func:`logit_transform` works on any config object.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from . import layer_loss, require
from .trl import _side

__all__ = ["KDTrainer", "logit_transform"]  # noqa: F822 (KDTrainer: built on first access)

TRANSFORMERS_VERSION = "5.24.0"  # the transformers release this module was written against

_IGNORE = -100
_NOT_MODEL_INPUTS = ("labels", "shift_labels", "num_items_in_batch")


def logit_transform(config) -> tuple[float, Optional[float]]:
    """``(scale, softcap)`` of a causal LM's logits, read from its config as TRL 1.16's
    ``DistillationTrainer`` reads them: the logits are ``z = scale * x``, then, with a softcap
    ``c``, ``c * tanh(z / c)`` (kdfused's ``*_logit_scale`` and ``*_softcap``).

    The text config (``config.get_text_config()`` where it exists) gives the scale from the first
    of ``logit_scale`` (Cohere), ``output_multiplier``, ``lm_head_multiplier`` (Falcon-H1) that is
    not None, else from ``logits_scaling`` as ``1 / logits_scaling`` (Granite, MiniCPM3) or, for
    ``model_type == "hyperclovax"``, ``logits_scaling`` itself; none of them: 1.0. The softcap is
    ``final_logit_softcapping`` (Gemma 2), None when absent or None.
    """
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    scale = None
    for name in ("logit_scale", "output_multiplier", "lm_head_multiplier"):
        scale = getattr(config, name, None)
        if scale is not None:
            break
    if scale is None and getattr(config, "logits_scaling", None) is not None:
        s = config.logits_scaling
        scale = s if getattr(config, "model_type", None) == "hyperclovax" else 1 / s
    softcap = getattr(config, "final_logit_softcapping", None)
    return (1.0 if scale is None else float(scale)), (None if softcap is None else float(softcap))


def _forward_redirection(
    wrapper: torch.nn.Module, module: torch.nn.Module, method: Callable, *args
):
    """``method(*args)`` called from inside ``wrapper``'s forward (``module`` is the model that
    ``wrapper`` wraps, or ``wrapper`` itself), so that DDP / FSDP run their pre- and post-forward
    work around it (TRL's ``_ForwardRedirection``, after PyTorch Lightning's)."""
    patched = "forward" in vars(module)  # e.g. accelerate's autocast wrapper
    original = module.forward

    def restore():
        if patched:
            module.forward = original
        else:
            vars(module).pop("forward", None)

    def forward(*a, **kw):
        restore()  # the method may call the real forward
        return method(*a, **kw)

    module.forward = forward
    try:
        return wrapper(*args)
    finally:
        restore()


def _is_peft(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(getattr(model, "base_model", None), "model")


def _backbone(model: torch.nn.Module) -> torch.nn.Module:
    """The model without its lm-head (its ``base_model``, or ``model`` where ``base_model`` is the
    model itself)."""
    if _is_peft(model):
        model = model.base_model.model
    backbone = getattr(model, "base_model", None)
    if backbone is None or backbone is model:
        backbone = getattr(model, "model", None)
    if not isinstance(backbone, torch.nn.Module) or backbone is model:
        raise ValueError(
            f"KDTrainer: cannot find the backbone of {type(model).__name__} (neither "
            "`base_model` nor `model` is a submodule returning `last_hidden_state`)"
        )
    return backbone


def _head(model: torch.nn.Module):
    head = model.get_output_embeddings()
    if head is None or not isinstance(getattr(head, "weight", None), torch.Tensor):
        raise ValueError(
            f"KDTrainer: {type(model).__name__}.get_output_embeddings() gives no lm-head weight"
        )
    return head.weight, getattr(head, "bias", None)


def _last_hidden_state(model: torch.nn.Module, model_inputs: dict) -> torch.Tensor:
    return _backbone(model)(**model_inputs, use_cache=False).last_hidden_state


def _shifted_labels(inputs: dict) -> torch.Tensor:
    """Per position t, the label it predicts: ``labels[t + 1]`` (-100 at the last position), or
    the collator's ``shift_labels``."""
    if inputs.get("shift_labels") is not None:
        return inputs["shift_labels"]
    labels = inputs.get("labels")
    if labels is None:
        raise ValueError(
            "KDTrainer: the batch has no `labels` (needed for the token mask and the hard loss); "
            "use a collator that sets them, e.g. DataCollatorForLanguageModeling(tokenizer, "
            "mlm=False), or labels = input_ids with -100 at padding"
        )
    pad = labels.new_full((*labels.shape[:-1], 1), _IGNORE)
    return torch.cat([labels[..., 1:], pad], dim=-1)


def _build():
    transformers = require(
        "transformers", "transformers", TRANSFORMERS_VERSION, what="kdfused KDTrainer"
    )
    from .._options import parse

    class KDTrainer(transformers.Trainer):
        """``transformers.Trainer`` distilling ``teacher_model`` into ``model`` with
        :func:`kdfused.linear_kd_loss` (see :mod:`kdfused.integrations.transformers`).

        Args:
            model: the student, a causal LM (``get_output_embeddings()``, ``base_model``).
            teacher_model: the teacher, with an lm-head of as many rows (vocabulary) as the
                student's; it is not trained.
            args: ``TrainingArguments`` (None: the Trainer's defaults).
            temperature, soft_weight, hard_weight, divergence, beta: the loss's options, as for
                :func:`kdfused.kd_loss`; checked here (ValueError / TypeError).
            chunk_size: rows per chunk of :func:`kdfused.linear_kd_loss` (None: its choice).
            **trainer_kwargs: the Trainer's other arguments (train_dataset, data_collator, ...).
        """

        def __init__(
            self,
            model,
            teacher_model,
            args=None,
            *,
            temperature: float = 2.0,
            soft_weight: float = 0.5,
            hard_weight: float = 0.5,
            divergence: str = "kl",
            beta: float = 0.5,
            chunk_size: Optional[int] = None,
            **trainer_kwargs,
        ):
            if trainer_kwargs.get("compute_loss_func") is not None:
                raise ValueError("KDTrainer computes its own loss: compute_loss_func is not used")
            if teacher_model is None or isinstance(teacher_model, str):
                raise TypeError("KDTrainer: teacher_model must be a model (an nn.Module)")
            s_scale, s_cap = logit_transform(model.config)
            t_scale, t_cap = logit_transform(teacher_model.config)
            options = (temperature, soft_weight, hard_weight, divergence, beta, _IGNORE, "sum")
            # the loss's own checks, once, with its messages
            self.kd_options = parse(*options, s_scale, t_scale, s_cap, t_cap, who="KDTrainer")
            if chunk_size is not None and (
                isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0
            ):
                raise ValueError(
                    f"KDTrainer: chunk_size must be an int > 0 or None, got {chunk_size!r}"
                )
            self.kd_chunk_size = chunk_size
            sv = _head(model)[0].shape[0]
            tv = _head(teacher_model)[0].shape[0]
            if sv != tv:
                raise ValueError(
                    f"KDTrainer: the student's lm-head has {sv} rows (vocabulary) but the "
                    f"teacher's has {tv}: distillation compares whole next-token distributions, so "
                    "both models need the same vocabulary"
                )
            super().__init__(model, args, **trainer_kwargs)
            if self.args.n_gpu > 1:
                raise ValueError(
                    "KDTrainer does not support nn.DataParallel (several GPUs visible to one "
                    "process): launch with torchrun or accelerate launch, or make one GPU visible"
                )
            if self.is_deepspeed_enabled:
                raise ValueError("KDTrainer does not support DeepSpeed")
            # The loss is normalised by num_items_in_batch as a model taking loss kwargs does:
            # the Trainer then counts the valid (shifted) labels of the accumulated batch and
            # does not divide the loss by the accumulation steps.
            self.model_accepts_loss_kwargs = True
            self._loss_shifts_labels = True
            self.teacher_model = self.accelerator.prepare_model(teacher_model, evaluation_mode=True)
            self.teacher_model.eval()

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            unwrapped = self.accelerator.unwrap_model(model)
            # accelerate's mixed precision wraps the models' forward in autocast; the
            # redirection calls the backbones instead, so it enters autocast itself
            with self.accelerator.autocast():
                loss = _forward_redirection(
                    model, unwrapped, self._kd_loss, unwrapped, inputs, num_items_in_batch
                )
            if num_items_in_batch is not None and self.args.average_tokens_across_devices:
                # num_items_in_batch counts every process's tokens and DDP averages the
                # gradients: as transformers' Trainer.compute_loss does
                loss = loss * (self.accelerator.num_processes // self.get_tp_size())
            return (loss, None) if return_outputs else loss

        def _kd_loss(self, student, inputs: dict, num_items_in_batch) -> torch.Tensor:
            labels = _shifted_labels(inputs)
            model_inputs = {k: v for k, v in inputs.items() if k not in _NOT_MODEL_INPUTS}
            hidden = _last_hidden_state(student, model_inputs)
            teacher = self.teacher_model
            unwrapped_teacher = self.accelerator.unwrap_model(teacher)
            teacher.eval()
            with torch.no_grad():
                t_hidden = _forward_redirection(
                    teacher, unwrapped_teacher, _last_hidden_state, unwrapped_teacher, model_inputs
                )
            sw, sb = _head(student)
            tw, tb = _head(unwrapped_teacher)
            hidden = hidden.to(sw.device)
            sh, sw, sb = _side(hidden, sw, sb, teacher=False)
            th, tw, tb = _side(t_hidden.to(tw.device), tw, tb, teacher=True)
            if th.dtype != sh.dtype or th.device != sh.device:
                th, tw = th.to(sh.device, sh.dtype), tw.to(sh.device, sh.dtype)
                tb = tb.to(sh.device, sh.dtype) if tb is not None else None
            labels = labels.reshape(-1).to(sh.device)
            loss = layer_loss(
                (sh, sw, sb),
                (th, tw, tb),
                labels,
                chunk_size=self.kd_chunk_size,
                **self.kd_options.kwargs,  # reduction "sum", ignore_index -100, the transforms
            )
            if num_items_in_batch is None:
                return loss / (labels != _IGNORE).sum().clamp(min=1).to(loss.dtype)
            if isinstance(num_items_in_batch, torch.Tensor):
                num_items_in_batch = num_items_in_batch.to(loss.device)
            return loss / num_items_in_batch

        def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
            """The loss of :meth:`compute_loss` on the batch (its mean over the valid tokens);
            no logits or labels."""
            inputs = self._prepare_inputs(inputs)
            with torch.no_grad(), self.compute_loss_context_manager():
                loss = self.compute_loss(model, inputs)
            return loss.detach(), None, None

    KDTrainer.__module__ = __name__
    return KDTrainer


_CACHE: dict[str, Any] = {}


def __getattr__(name: str):
    if name == "KDTrainer":
        if name not in _CACHE:
            _CACHE[name] = _build()
        return _CACHE[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | {"KDTrainer"})
