"""A drop-in for Liger-Kernel 0.8.5's ``LigerFusedLinearJSDLoss``, computed by kdfused.

    from kdfused.integrations.liger import FusedLinearJSDLoss

    # was: from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss
    loss_fn = FusedLinearJSDLoss(weight_hard_loss=0.5, weight_soft_loss=0.5, beta=0.5,
                                 ignore_index=-100, temperature=2.0)
    loss = loss_fn(student_hidden, lm_head.weight,            # (N, H), (V, H)
                   teacher_hidden, teacher_lm_head.weight,    # (N, H_t), (V_t, H_t)
                   labels,                                    # (N,) int64
                   student_bias=None, teacher_bias=None)
    loss.backward()     # gradients of student_hidden, lm_head.weight (and the student bias)

    # or from an existing Liger module (this one needs liger-kernel installed):
    loss_fn = FusedLinearJSDLoss.from_liger(liger_loss_fn)

Same constructor, same forward signature, same value and same gradients as Liger's module.
Liger-Kernel itself is not needed, except by ``from_liger``.

Liger's loss, which this reproduces exactly (``liger_kernel/chunked_loss/jsd_loss.py`` and
``fused_linear_distillation.py``), with ``n`` the number of rows whose label is not
``ignore_index`` (at least 1), student logits ``s``, teacher logits ``t``, ``T`` the temperature:

    loss = weight_hard_loss * sum_valid CE(s, y) / n
         + weight_soft_loss * sum_valid JSD_beta(softmax(t / T), softmax(s / T)) / n

- the hard term is the cross-entropy of the untempered student logits;
- JSD_beta(p, q) = beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q, with p the
  teacher: beta = 0 is KL(teacher || student), beta = 1 is KL(student || teacher). This is
  kdfused's ``divergence="jsd"`` with the same ``beta``, ends included;
- no T^2 factor (kdfused multiplies the soft term by T^2, so it is given
  ``soft_weight = weight_soft_loss / T^2``);
- ignored rows count in neither term nor in ``n``; with no valid row the loss is 0.

So the whole loss is one call of :func:`kdfused.linear_kd_loss` (``reduction="mean"``): one pass
over the rows, with no N x V logits. Two cases take two calls (two passes): with
``return_soft_hard_loss=True`` (the soft and the hard loss are returned apart, as Liger does;
here they carry gradients too), and when the teacher's vocabulary is larger than the student's
(Liger pads the student's tempered logits with zeros up to the teacher's width for the soft
term, while its hard term is over the student's vocabulary; the padding is a copy of the
student's weight with zero rows appended).

Differences from Liger, none of which changes a result:

- ``compiled`` is accepted and ignored: kdfused's loss is one custom op, with nothing to compile.
- ``chunk_size`` is the number of rows per chunk passed to kdfused; the default ``None`` lets
  kdfused choose (about 64 MiB of logits per chunk). Liger's default is 1024 rows. The loss does
  not depend on it beyond floating-point rounding.
- The teacher tensors are detached (Liger computes the teacher's logits under ``no_grad``).
- Arguments kdfused rejects raise ValueError before any computation: a temperature that is not
  finite and > 0 (Liger accepts a negative one), a beta outside [0, 1], mismatched shapes.
- Accuracy: kdfused accumulates in float32 and reduces the rows in float64, also for bfloat16
  and float16 inputs, where Liger computes the soft term in the inputs' dtype; for 16-bit inputs
  the two agree to that dtype's rounding, not bitwise.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F

from . import layer_loss, require

__all__ = ["FusedLinearJSDLoss"]

LIGER_VERSION = "0.8.5"  # the Liger-Kernel release whose semantics this module reproduces


class FusedLinearJSDLoss(torch.nn.Module):
    """Liger-Kernel's ``LigerFusedLinearJSDLoss`` (0.8.5), computed by ``kdfused.linear_kd_loss``.

    Args (as Liger's):
        weight_hard_loss: weight of the cross-entropy of the untempered student logits.
        weight_soft_loss: weight of the JSD of the tempered distributions (no T^2 factor).
        beta: the JSD's beta in [0, 1], weighting the teacher's KL to the mixture; 0 gives
            KL(teacher || student), 1 gives KL(student || teacher).
        ignore_index: label of the rows left out of both terms and of the row count.
        temperature: divides both sides' logits in the soft term; finite and > 0.
        compiled: accepted for compatibility; ignored.
        chunk_size: rows per chunk, or ``None`` (the default) for kdfused's automatic choice.
        return_soft_hard_loss: when True the forward returns ``(loss, soft_loss, hard_loss)``,
            the two unweighted terms apart.
    """

    def __init__(
        self,
        weight_hard_loss: float = 0.5,
        weight_soft_loss: float = 0.5,
        beta: float = 0.5,
        ignore_index: int = -100,
        temperature: float = 1.0,
        compiled: bool = True,
        chunk_size: Optional[int] = None,
        return_soft_hard_loss: bool = False,
    ):
        super().__init__()
        if temperature == 0:
            raise ValueError("Temperature cannot be 0.")
        self.weight_hard_loss = weight_hard_loss
        self.weight_soft_loss = weight_soft_loss
        self.ignore_index = ignore_index
        self.temperature = temperature
        self.compiled = compiled
        self.beta = beta
        self.chunk_size = chunk_size
        self.return_soft_hard_loss = return_soft_hard_loss

    @classmethod
    def from_liger(cls, module) -> FusedLinearJSDLoss:
        """The equivalent of a ``liger_kernel.chunked_loss.LigerFusedLinearJSDLoss`` instance,
        with its settings (its ``chunk_size`` too). Needs liger-kernel installed."""
        chunked = require(
            "liger_kernel.chunked_loss", "liger-kernel", LIGER_VERSION, what="from_liger"
        )
        if not isinstance(module, chunked.LigerFusedLinearJSDLoss):
            raise TypeError(
                f"from_liger expects a LigerFusedLinearJSDLoss, got {type(module).__name__}"
            )
        return cls(
            weight_hard_loss=module.weight_hard_loss,
            weight_soft_loss=module.weight_soft_loss,
            beta=module.beta,
            ignore_index=module.ignore_index,
            temperature=module.temperature,
            compiled=module.compiled,
            chunk_size=module.chunk_size,
            return_soft_hard_loss=getattr(module, "return_soft_hard_loss", False),
        )

    def _call(self, sh, sw, th, tw, labels, sb, tb, soft_weight, hard_weight) -> torch.Tensor:
        T = float(self.temperature)
        return layer_loss(
            (sh, sw, sb),
            (th, tw, tb),
            labels,
            temperature=T,
            soft_weight=soft_weight / (T * T),
            hard_weight=hard_weight,
            divergence="jsd",
            beta=self.beta,
            ignore_index=self.ignore_index,
            reduction="mean",
            chunk_size=self.chunk_size,
        )

    def _hard(self, sh, sw, labels, sb) -> torch.Tensor:
        # The cross-entropy alone: with soft_weight 0 the teacher is never read, so it is given
        # as a zero-width layer (its GEMM has nothing to multiply).
        th = sh.new_empty(sh.shape[:-1] + (0,)).detach()
        tw = sw.new_empty((sw.shape[0], 0)).detach()
        return self._call(sh, sw, th, tw, labels, sb, None, 0.0, 1.0)

    def forward(
        self,
        student_input: torch.Tensor,
        student_weight: torch.Tensor,
        teacher_input: torch.Tensor,
        teacher_weight: torch.Tensor,
        true_labels: torch.LongTensor,
        student_bias: Optional[torch.Tensor] = None,
        teacher_bias: Optional[torch.Tensor] = None,
    ) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        sh, sw, sb, y = student_input, student_weight, student_bias, true_labels
        th, tw = teacher_input.detach(), teacher_weight.detach()
        tb = teacher_bias.detach() if teacher_bias is not None else None
        w_hard, w_soft = self.weight_hard_loss, self.weight_soft_loss

        pad = tw.shape[0] - sw.shape[0]
        if pad <= 0 and not self.return_soft_hard_loss:
            return self._call(sh, sw, th, tw, y, sb, tb, w_soft, w_hard)

        if pad > 0:  # the student's tempered logits padded with zeros to the teacher's width
            sw_soft = F.pad(sw, (0, 0, 0, pad))
            sb_soft = F.pad(sb, (0, pad)) if sb is not None else None
        else:
            sw_soft, sb_soft = sw, sb
        if not self.return_soft_hard_loss:
            loss = self._call(sh, sw_soft, th, tw, y, sb_soft, tb, w_soft, 0.0)
            if w_hard != 0:  # Liger skips the hard term when its weight is 0
                loss = loss + w_hard * self._hard(sh, sw, y, sb)
            return loss
        soft = self._call(sh, sw_soft, th, tw, y, sb_soft, tb, 1.0, 0.0)
        hard = self._hard(sh, sw, y, sb)
        return w_hard * hard + w_soft * soft, soft, hard
