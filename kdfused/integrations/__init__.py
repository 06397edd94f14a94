"""Drop-in replacements for other libraries' distillation losses, and a distilling Hugging Face
Trainer, computed by kdfused.

    from kdfused.integrations.liger import FusedLinearJSDLoss   # for Liger-Kernel's
    loss_fn = FusedLinearJSDLoss(weight_hard_loss=0.5, weight_soft_loss=0.5, beta=0.5,
                                 temperature=2.0)              # LigerFusedLinearJSDLoss

Modules:
  liger   ``FusedLinearJSDLoss``: the constructor, forward signature and numbers of
          ``liger_kernel.chunked_loss.LigerFusedLinearJSDLoss`` (Liger-Kernel 0.8.5).
  trl     ``chunked_divergence_loss``: the signature, return values and numbers of
          ``trl.trainer.distillation_trainer._chunked_divergence_loss``, the loss of TRL's
          ``DistillationTrainer`` (TRL 1.16.0); ``DistillationTrainer``: TRL's trainer (a
          subclass, the same constructor) with that loss computed by kdfused;
          ``patch_distillation_trainer()`` makes TRL's own trainer use it.
  transformers  ``KDTrainer``: a ``transformers.Trainer`` (transformers 5.24) that distils a
          teacher causal LM into the student with one ``kdfused.linear_kd_loss`` call per
          micro-batch, on both backbones' hidden states; ``logit_transform(config)``: the logit
          scale and softcap a model's config asks for.

The replacements compute with kdfused alone: the other library is not needed to use them. It is
imported only where one of its own objects is asked for (e.g. ``FusedLinearJSDLoss.from_liger``,
``trl.DistillationTrainer``, ``trl.patch_distillation_trainer``, ``transformers.KDTrainer``), on
first use; when it is not installed, that raises ImportError naming the package and the pip
command that installs it. The submodules themselves are imported on first attribute access.
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["liger", "require", "transformers", "trl"]

_SUBMODULES = ("liger", "transformers", "trl")


def require(module: str, package: str, version: str | None = None, *, what: str = "") -> ModuleType:
    """Imports and returns ``module``, an optional dependency; when it cannot be imported, raises
    ImportError naming ``package`` (the distribution that provides it) and the pip command that
    installs it (pinned to ``version`` when given), chained to the original error."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        spec = f"{package}=={version}" if version else package
        who = f"{what} needs" if what else "this needs"
        raise ImportError(
            f"kdfused.integrations: {who} the optional package {package!r} "
            f"(import of {module!r} failed: {e}); install it with: pip install {spec}",
            name=module,
        ) from e


def layer_loss(student: tuple, teacher: tuple, labels, **options):
    """``kdfused.linear_kd_loss`` of two output layers, each given as ``(hidden, weight, bias)``
    (``bias`` may be None), with ``options`` its keywords: the call every integration makes."""
    import kdfused  # (its ops load on first use)

    (sh, sw, sb), (th, tw, tb) = student, teacher
    return kdfused.linear_kd_loss(
        sh, sw, th, tw, labels, student_bias=sb, teacher_bias=tb, **options
    )


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_SUBMODULES))
