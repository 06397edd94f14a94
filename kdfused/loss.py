"""Public API: :func:`kd_loss`, the :class:`KDLoss` module and :class:`KDLossFunction`.

Every autograd path leads to the same backward code (``_backward.backward``):

- :func:`kd_loss` (and :class:`KDLoss`) call the custom op ``torch.ops.kdfused.kd_loss``, whose
  autograd is registered with ``torch.library.register_autograd`` (``_ops.py``). That is the
  path torch.compile, AOTAutograd and ``torch.library.opcheck`` know for a custom op (dynamo
  treats the op as opaque; AOTAutograd traces its registered backward), and the path of every
  call that is traced, transformed (functorch), intercepted by a mode or made on tensor
  subclasses. An eager call on plain tensors calls the op's kernel directly, below the autograd
  key, under ``_ops._KDLossEager``, a Function with the same saved state and backward: the
  generic wrapper of ``register_autograd`` costs more than the whole call at small sizes
  (``_ops.kd_loss_op``).
- :class:`KDLossFunction` is a ``torch.autograd.Function`` over the same op, for code that
  composes Functions (``Function.apply`` with positional arguments). Its backward calls the same
  ``_backward.backward``: one implementation of the scaling, not two copies.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch

from . import _checks
from ._backward import backward, keep
from ._module import OptionsModule
from ._ops import _below_autograd, _kd_loss_kernel, _lib_ops, _plain_eager, kd_loss_op
from ._options import KDOptions, LossOptions, parse, parse_keywords, takes_options

if TYPE_CHECKING:
    from typing_extensions import Unpack


@takes_options()
def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: Optional[torch.Tensor] = None,
    *,
    return_entropy: bool = False,
    process_group=None,
    **options: Unpack[LossOptions],
):
    r"""Knowledge-distillation loss (Hinton, Vinyals & Dean 2015), fused.

    Per row :math:`r` of the flattened leading dimensions, with :math:`T` the temperature,
    :math:`p = \mathrm{softmax}(t_r / T)` and :math:`q = \mathrm{softmax}(s_r / T)`:

    .. math::
        \ell_r = w_s T^2 D(p \,\|\, q) + w_h \, \mathrm{CE}(s_r, y_r)

    where :math:`D` is one of

    - ``"kl"``: :math:`\mathrm{KL}(p\|q) = \sum p (\log p - \log q)` (the default);
    - ``"ce"``: the soft-target cross-entropy :math:`-\sum p \log q`;
    - ``"reverse_kl"``: :math:`\mathrm{KL}(q\|p)`;
    - ``"jsd"``: the generalised Jensen-Shannon divergence
      :math:`\beta\,\mathrm{KL}(p\|m) + (1-\beta)\,\mathrm{KL}(q\|m)`,
      :math:`m = \beta p + (1-\beta) q`; ``beta=0`` is exactly ``"kl"`` and ``beta=1`` exactly
      ``"reverse_kl"`` (as in TRL's GKD and Liger's JSD);
    - ``"tvd"``: the total variation distance :math:`\tfrac12 \sum |p - q|` (subgradient 0 where
      :math:`p = q`);

    and the hard term is the ordinary cross-entropy at :math:`T = 1`. A term whose weight is
    exactly 0 is not computed at all.

    Args:
        student_logits: ``(..., V)`` float16/bfloat16/float32/float64. Row-strided views (e.g.
            ``logits[:, :-1]``) are read in place; a non-contiguous last dim is copied.
        teacher_logits: same shape and device; may have another float dtype. Gets a gradient (from
            the same kernel) when it requires grad, e.g. for online/mutual distillation.
        labels: ``(...)`` int64 (or int32) class indices, or ``None``. Needed when
            ``hard_weight > 0``. Rows whose label equals ``ignore_index`` contribute 0 to the loss
            and to every gradient.
        temperature: :math:`T > 0`, finite.
        soft_weight, hard_weight: :math:`w_s, w_h \ge 0`, finite.
        divergence: ``"kl"``, ``"ce"``, ``"reverse_kl"``, ``"jsd"`` or ``"tvd"``.
        beta: the JSD's mixture weight, in :math:`[0, 1]` (used by ``"jsd"`` only).
        ignore_index: label value marking rows to ignore.
        reduction: ``"batchmean"`` or ``"mean"`` (sum over valid rows / number of valid rows, 0.0
            when there is none; note that ``"mean"`` is per *row*, unlike ``F.kl_div``'s per-element
            mean), ``"sum"``, or ``"none"`` (shape ``student_logits.shape[:-1]``, 0 at ignored
            rows).
        student_logit_scale, teacher_logit_scale, student_softcap, teacher_softcap: the logit
            transform of each side, for models whose logits are not the raw ones: from the given
            logits :math:`x`, :math:`z = \mathrm{scale}\cdot x`, then, with a softcap :math:`c`,
            :math:`z = c \tanh(z / c)` (Gemma 2's ``final_logit_softcapping``; Cohere's
            ``logit_scale``, Granite's ``1 / logits_scaling``). Both terms use :math:`z`; the
            gradients flow through the transform. A ``-inf`` logit stays ``-inf``. A scale must be
            finite (0 and negative are accepted), a softcap ``None`` or finite and > 0
            (``ValueError`` otherwise). Computed inside the fused kernel, per element.
        return_entropy: also return the student's entropy per row (see Returns).
        process_group: ``None`` (the default: each call sees whole rows), or a
            ``torch.distributed`` process group (e.g. ``torch.distributed.group.WORLD``) over
            which the vocabulary is split: see "Vocabulary-parallel" below.

    Returns:
        The loss: float32 for 16/32-bit inputs, float64 if either input is float64. With
        ``return_entropy=True``, ``(loss, entropy)``: ``entropy`` has the leading shape and the
        loss's dtype, no gradient, and holds :math:`-\sum_v q_v \log q_v` of the student's
        tempered distribution :math:`q = \mathrm{softmax}(z_s / T)` per row (0 at ignored rows),
        computed in the same kernel; the loss is bitwise the one without it.

    Masked vocabulary: a ``-inf`` column shared by student and teacher contributes nothing (never
    NaN, in the loss and in both gradients); a ``-inf`` teacher logit has probability 0 and
    contributes nothing to ``"kl"`` / ``"ce"``; a ``-inf`` logit on one side where the other side
    has mass makes ``"kl"`` / ``"reverse_kl"`` ``+inf`` (``"jsd"`` and ``"tvd"`` stay finite); a
    row that is ``-inf`` everywhere has no distribution and gives NaN, like ``torch.softmax``.
    Ignored rows give 0 loss and 0 gradient whatever they hold.

    The gradients are computed in the forward call (one fused pass) when an input requires grad;
    ``loss.backward()`` then costs no pass over the logits. Under ``torch.no_grad()`` only the loss
    is computed. Results are bitwise deterministic. With ``retain_graph=True`` each backward costs
    one pass (a scaled copy of the saved gradient) and may be repeated with any ``grad_output``.
    For float16/bfloat16 inputs and ``grad_output != 1`` the gradient is rounded twice (once in the
    forward, once when scaled), i.e. within one ulp more than a single rounding.
    Double backward (``create_graph=True``) is not supported and raises ``RuntimeError``.
    :class:`KDLossFunction` is the same loss as a ``torch.autograd.Function`` (positional
    arguments); ``kdfused.reference.kd_loss`` the same loss in plain PyTorch.

    Vocabulary-parallel (``process_group`` given; CPU tensors with gloo; CUDA tensors with nccl:
    compiled, not run on a GPU yet): the last dim of
    ``student_logits`` and ``teacher_logits`` is this process's contiguous slice of the vocabulary;
    slices are in group-rank order and may differ in width (the offsets are found from the
    others). ``labels`` hold *global* vocabulary indices and must be identical on every process,
    as must the leading shape, the dtypes and the options. The returned loss is the loss of the
    whole rows, bitwise identical on every process; the gradients are this process's slices of
    the whole gradients. Communication per call: one ``all_gather`` of 8 int64 per process
    (shapes, dtypes, options and a labels checksum, so that inconsistent inputs raise the same
    ``ValueError`` on every process instead of blocking), one ``all_gather`` of 10 floats per row
    and process (40 bytes in float32, 80 in float64: each slice's maxima and sums), and for
    ``"jsd"`` / ``"tvd"`` one more of 3 floats per row; none in backward. Label values outside the
    whole vocabulary raise on every process. What cannot be checked before a collective: a
    process that never calls the loss (the others block until the group's timeout). Under
    ``torch.compile`` the call is a graph break (``fullgraph=True`` raises). See
    docs/design.md, "Vocabulary-parallel".

    Example::

        >>> s = torch.randn(8, 100, requires_grad=True); t = torch.randn(8, 100)
        >>> y = torch.randint(0, 100, (8,))
        >>> loss = kd_loss(s, t, y, temperature=4.0, soft_weight=0.9, hard_weight=0.1)
        >>> loss.backward()
    """
    _checks.check_logits_types(student_logits, teacher_logits, labels)
    # With a process group the option values are checked with the tensors, inside the exchange
    # (a bad value on one process must not leave the others blocked in a collective).
    parsed = parse_keywords("kd_loss", options, check_values=process_group is None)
    _checks.check_flag("return_entropy", return_entropy)
    return _dispatch(student_logits, teacher_logits, labels, parsed, process_group, return_entropy)


def _dispatch(
    student_logits, teacher_logits, labels, options: KDOptions, process_group, entropy=False
):
    if process_group is not None:
        from .parallel import vocab_parallel_kd_loss

        return vocab_parallel_kd_loss(
            student_logits, teacher_logits, labels, process_group, options, entropy
        )
    return kd_loss_op(student_logits, teacher_logits, labels, options, entropy)


class KDLoss(OptionsModule):
    """Module form of :func:`kd_loss`; the keywords are checked when the module is built
    (``process_group`` as for :func:`kd_loss`).

    Example::

        >>> crit = KDLoss(temperature=4.0, soft_weight=0.9, hard_weight=0.1)
        >>> loss = crit(student_logits, teacher_logits.detach(), labels)
    """

    _function = kd_loss
    _extra = ("process_group",)

    def forward(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        labels: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        _checks.check_logits_types(student_logits, teacher_logits, labels)
        return _dispatch(student_logits, teacher_logits, labels, self.options, self.process_group)

    def extra_repr(self) -> str:
        group = "" if self.process_group is None else ", process_group=..."
        return super().extra_repr() + group


class KDLossFunction(torch.autograd.Function):
    """:func:`kd_loss` as a ``torch.autograd.Function``, with positional arguments::

        loss = KDLossFunction.apply(student_logits, teacher_logits, labels, temperature,
                                    soft_weight, hard_weight, divergence, ignore_index, reduction,
                                    beta)  # beta optional (default 0.5)

    Every argument means what it means for :func:`kd_loss` (``labels`` may be ``None``); the loss
    and both gradients are the same, bitwise. The gradients are computed in the forward call by
    the same fused op, and the backward is the op's own (scaling in place, nothing to do for
    ``loss.backward()``; ``retain_graph=True`` works; double backward raises ``RuntimeError``).
    Works under ``torch.compile(fullgraph=True)``.

    Example::

        >>> loss = KDLossFunction.apply(s, t, y, 4.0, 0.9, 0.1, "kl", -100, "batchmean")
        >>> loss.backward()
    """

    @staticmethod
    def forward(
        ctx,
        student_logits,
        teacher_logits,
        labels,
        temperature,
        soft_weight,
        hard_weight,
        divergence,
        ignore_index,
        reduction,
        beta=0.5,
    ):
        _checks.check_logits_types(student_logits, teacher_logits, labels)
        options = parse(
            temperature, soft_weight, hard_weight, divergence, beta, ignore_index, reduction
        )
        need_s, need_t = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        args = (student_logits, teacher_logits, labels, *options.op_args, False, need_s, need_t)
        if _plain_eager(student_logits, teacher_logits, labels):
            with _below_autograd():  # (grad mode is off here: the op's autograd would pass)
                loss, *grads, _entropy = _kd_loss_kernel(*args)
        else:
            loss, *grads, _entropy = _lib_ops.kd_loss(*args)
        # The op's saved state, as the registered autograd keeps it (_ops._setup_context).
        keep(ctx, (need_s, need_t), tuple(grads))
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        return backward(ctx, grad_loss, 10, "kd_loss")
