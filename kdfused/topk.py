"""Offline distillation from a stored top-k teacher: :func:`topk_kd_loss`, :class:`TopKKDLoss`
and :func:`topk_teacher`, with the fake kernel and the autograd registration of the op
``torch.ops.kdfused.topk_kd_loss``.

The op returns the loss *and* the gradient of the reduced loss w.r.t. the student for
grad_output = 1; the backward only rescales it, with the same ``kd_scale_grads_`` op that
:func:`kdfused.kd_loss` uses (in place, nothing moves when grad_output == 1).

The options travel as one frozen :class:`TopKOptions` (kd_loss's :class:`KDOptions`, the support
and the kind of stored values), checked once by :func:`_topk_options` (cached) and passed to the
op as ``TopKOptions.op_args``; :mod:`kdfused.linear_topk` reuses all three.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import TYPE_CHECKING, Optional

import torch

from . import (
    _C,  # noqa: F401  (loads the library that defines torch.ops.kdfused)
    _backward,
    _checks,
    _fake,
)
from ._checks import DIVERGENCES, SUPPORTS, VALUE_KINDS  # noqa: F401  (the option names, for callers)
from ._checks import FLOAT_DTYPES as _FLOATS
from ._module import OptionsModule
from ._options import (
    TOPK_DEFAULTS,
    TOPK_OPTION_DEFAULTS,
    TOPK_PARAMETERS,
    KDOptions,
    TopKLossOptions,
    cached_call,
    option_values,
    parse,
    takes_options,
)

if TYPE_CHECKING:
    from typing_extensions import Unpack

# The schema's inputs: student, teacher_indices, teacher_values, labels, the 8 options of
# KDOptions.op_args, support, values, grad_student.
_N_INPUTS = 15


# ---- options ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TopKOptions:
    """The options of :func:`topk_kd_loss`: kd_loss's (``options``), the ``support`` and the kind
    of stored ``values``. Build it with :func:`_topk_options` (which checks)."""

    options: KDOptions
    support: str = TOPK_DEFAULTS["support"]
    values: str = TOPK_DEFAULTS["values"]

    @property
    def op_args(self) -> tuple:
        """The op's arguments after ``labels`` and before ``grad_student``, in its order."""
        return (*self.options.op_args, self.support, self.values)

    @property
    def kwargs(self) -> dict:
        """Every option as the keyword arguments of :func:`topk_kd_loss`, in its order."""
        kw = self.options.kwargs
        return {n: kw[n] if n in kw else getattr(self, n) for n in TOPK_OPTION_DEFAULTS}

    def describe(self) -> str:
        """``temperature=..., ...``, as the modules print themselves (support and values only
        where they are not the defaults)."""
        extra = [
            f"{n}={getattr(self, n)!r}" for n, d in TOPK_DEFAULTS.items() if getattr(self, n) != d
        ]
        return ", ".join([self.options.describe(), *extra])


def _teacher_transformed(options: KDOptions) -> bool:
    return options.teacher_logit_scale != 1.0 or options.teacher_softcap is not None


# Where support and values stand among the top-k ops' options (after beta).
_OWN = list(TOPK_OPTION_DEFAULTS).index("support")


def _parse_topk(who, divergences, check_values, function, /, **keywords) -> TopKOptions:
    values = option_values(function, keywords, TOPK_OPTION_DEFAULTS)
    support, kind = values[_OWN : _OWN + 2]
    shared = values[:_OWN] + values[_OWN + 2 :]  # KDOptions' fields
    options = parse(*shared, who=who, divergences=divergences, check_values=check_values)
    _checks.check_topk_option_types(support, kind)
    if check_values:
        _checks.check_topk_options(options.divergence, support, kind, _teacher_transformed(options))
    return TopKOptions(options, support, kind)


# typed, as _options' cache: 1 and 1.0 are different keys. A call that raises caches nothing.
_topk_options_cached = functools.lru_cache(maxsize=256, typed=True)(_parse_topk)


def _topk_options(function: str, keywords: dict) -> TopKOptions:
    """The checked options that a call of ``function`` gave as ``keywords``: the types
    (TypeError; a keyword it does not take too), then the values (ValueError; the C++ op's
    messages). Cached: a training loop passes the same options at every call."""
    args = ("kdfused", DIVERGENCES, True, function)
    return cached_call(_topk_options_cached, _parse_topk, *args, **keywords)


# ---- the op: fake kernel, autograd ----------------------------------------------------------


def _check_meta(student, indices, values_t, labels, *args):
    """The op's checks that need no data, for fake tensors (the C++ op runs the same checks,
    csrc/kd_topk.cpp)."""
    temperature, soft_weight, hard_weight, divergence, beta, _, reduction, logit_map = args[:8]
    support, values = args[8:]
    _checks.check_options(temperature, soft_weight, hard_weight, divergence, beta, reduction)
    # logit_map: () or (student scale, teacher scale, student softcap, teacher softcap; 0 = none)
    teacher_transformed = len(logit_map) == 4 and (logit_map[1] != 1.0 or logit_map[3] != 0.0)
    _checks.check_topk_options(divergence, support, values, teacher_transformed)
    _checks.check_topk_inputs(student, indices, values_t, labels, hard_weight)


@torch.library.register_fake("kdfused::topk_kd_loss")
def _topk_kd_loss_fake(student, indices, values, labels, *args):
    # args: TopKOptions.op_args (the schema's order), then the gradient flag.
    *options, grad_student = args
    reduction = options[6]
    tensors = (student, indices, values, labels)
    _fake.check_if_concrete(tensors, _check_meta, *tensors, *options)
    acc = _fake.accumulation_dtype(student, values)
    return _fake.outputs(student, acc, reduction, ((student, grad_student, student),))


def _setup_context(ctx, inputs, output):
    if inputs[2].requires_grad:
        raise ValueError(
            "kdfused: teacher_values must not require grad: topk_kd_loss gives no "
            "teacher gradient (detach the stored teacher)"
        )
    _backward.setup_context(ctx, output, (inputs[_N_INPUTS - 1],))


def _backward_topk(ctx, grad_loss, _gs, _scale):
    return _backward.backward(ctx, grad_loss, _N_INPUTS, "topk_kd_loss")


torch.library.register_autograd(
    "kdfused::topk_kd_loss", _backward_topk, setup_context=_setup_context
)


# ---- the function and the module -------------------------------------------------------------


@takes_options(TOPK_PARAMETERS)
def topk_kd_loss(
    student_logits: torch.Tensor,
    teacher_indices: torch.Tensor,
    teacher_values: torch.Tensor,
    labels: Optional[torch.Tensor] = None,
    **options: Unpack[TopKLossOptions],
) -> torch.Tensor:
    r"""Distillation loss against a stored top-k teacher, fused (offline distillation).

    Per row :math:`r` of the flattened leading dimensions, with :math:`T` the temperature,
    :math:`z` the student's logits (after its transform), :math:`i_j` the ``teacher_indices`` and
    :math:`v_j` the ``teacher_values``. Entry :math:`j` is *valid* iff :math:`v_j \ne -\infty`;
    the others are padding, outside the support on both sides (their index may be anything in
    :math:`[0, V)`, a duplicate included: TRL pads with 0).

    Teacher log-probabilities over the valid entries: ``values="logits"``:
    :math:`\log p = \mathrm{log\_softmax}(v / T)` (after the teacher transform);
    ``values="logprobs"`` (final, no temperature, no transform): :math:`\log p = v -
    \mathrm{logsumexp}(v)`, or :math:`v` as stored for ``support="tail"``.

    ``support``, the buckets compared:

    - ``"full"`` (default): the student over the whole vocabulary,
      :math:`\log q_j = \mathrm{log\_softmax}(z / T)_{i_j}`; ``"kl"`` and ``"ce"`` only.
    - ``"renormalized"``: both over the valid entries,
      :math:`\log q_j = z_{i_j} / T - \mathrm{logsumexp}_l(z_{i_l} / T)`.
    - ``"tail"`` (``values="logprobs"`` only): the valid entries as in ``"full"``, plus one tail
      bucket per side with the rest of the mass, :math:`\log(1 - \min(\sum_j e^{\log x_j},
      e^{-10^{-7}}))`.

    Over the buckets :math:`b`, with :math:`p = e^{\log p}`, :math:`q = e^{\log q}`:

    .. math::
        \mathrm{kl}: \sum p_b (\log p_b - \log q_b), \quad
        \mathrm{ce}: -\sum p_b \log q_b, \quad
        \mathrm{reverse\_kl}: \sum q_b (\log q_b - \log p_b), \quad
        \mathrm{tvd}: \tfrac12 \sum |p_b - q_b|,

        \mathrm{jsd}: \beta\, \mathrm{KL}(p \| m) + (1 - \beta)\, \mathrm{KL}(q \| m), \quad
        m = \beta p + (1 - \beta) q

    (:math:`\beta = 0` is kl, :math:`\beta = 1` reverse_kl; a :math:`0 \log 0` term is 0), and
    :math:`\ell_r = w_s T^2 D + w_h \, \mathrm{CE}(z_r, y_r)`, the hard term at :math:`T = 1`
    over the full student row. A row with no valid entry has :math:`D = 0` (only its hard term,
    never NaN). A term whose weight is exactly 0 is not computed. With ``"full"`` and
    :math:`k = V` this is :func:`kdfused.kd_loss`.

    Peers: TRL's server distillation (``trl.experimental.server_distillation``) stores the
    teacher's top-k log-probabilities padded with ``-inf`` at index 0; its ``loss_add_tail=False``
    is ``support="renormalized", values="logprobs"``, ``loss_add_tail=True`` is
    ``support="tail", values="logprobs"``, with its ``beta`` as ``divergence="jsd", beta=beta``
    and ``soft_weight = 1 / T**2`` (TRL does not scale by :math:`T^2`). Stored top-k
    log-probabilities compared with the student's full softmax (DistillKit-style) are
    ``support="full", values="logprobs"``.

    Args:
        student_logits: ``(..., V)`` float16/bfloat16/float32/float64.
        teacher_indices: ``(..., k)`` int64 or int32, ``1 <= k <= V``, in ``[0, V)``; the valid
            entries' distinct within a row (e.g. from :func:`topk_teacher`).
        teacher_values: ``(..., k)`` any float dtype: the teacher's logits or log-probabilities
            (``values``) at those indices, ``-inf`` for padding. Must not require grad
            (``ValueError``): no teacher gradient is computed.
        labels: ``(...)`` int64/int32 class indices or ``None`` (needed when ``hard_weight > 0``).
            Rows whose label equals ``ignore_index`` give 0 loss and 0 gradient.
        temperature, soft_weight, hard_weight, divergence, beta, ignore_index, reduction: as in
            :func:`kdfused.kd_loss` (``"full"`` takes ``"kl"``/``"ce"`` only).
        support: ``"full"``, ``"renormalized"`` or ``"tail"`` (above).
        values: ``"logits"`` or ``"logprobs"`` (above; ``"tail"`` needs ``"logprobs"``).
        student_logit_scale, student_softcap: the student's logit transform, as in
            :func:`kdfused.kd_loss` (in the kernel, on every student logit).
        teacher_logit_scale, teacher_softcap: the teacher's, applied to stored logits (with
            ``values="logprobs"``: ``ValueError``).

    Returns:
        The loss: float32, or float64 if ``student_logits`` or ``teacher_values`` is float64
        (also the accumulation type).

    The gradient w.r.t. ``student_logits`` is computed in the forward call when it requires
    grad; ``loss.backward()`` then costs no pass over the logits. Results are bitwise
    deterministic.

    Bad input raises ``ValueError``/``TypeError`` before anything is computed. On the CPU that
    includes index values (out of range, duplicates among a row's valid entries) and labels. On
    CUDA, checking values on the host would need a device-to-host sync, so the kernel checks
    them: an index out of range, a duplicate or a label out of range stops the kernel with a
    device-side assert, like PyTorch's own indexing and cross-entropy kernels.
    """
    _check_tensor_types(student_logits, teacher_indices, teacher_values, labels)
    parsed = _topk_options("topk_kd_loss", options)
    return _call(student_logits, teacher_indices, teacher_values, labels, parsed)


def _check_tensor_types(student_logits, teacher_indices, teacher_values, labels) -> None:
    required = (("student_logits", student_logits), ("teacher_indices", teacher_indices))
    required += (("teacher_values", teacher_values),)
    _checks.check_tensor_types("kdfused", required, (("labels", labels),))


def _call(student_logits, teacher_indices, teacher_values, labels, topk_options: TopKOptions):
    """The op on checked options: the loss (the gradient waits in the autograd graph)."""
    if teacher_values.requires_grad:
        raise ValueError(
            "kdfused: teacher_values must not require grad: topk_kd_loss gives no "
            "teacher gradient (detach the stored teacher)"
        )
    need = torch.is_grad_enabled() and student_logits.requires_grad
    return torch.ops.kdfused.topk_kd_loss(
        student_logits, teacher_indices, teacher_values, labels, *topk_options.op_args, need
    )[0]


class TopKKDLoss(OptionsModule):
    """Module form of :func:`topk_kd_loss`; the keywords are checked when the module is built
    (``self.options``: a :class:`TopKOptions`) and read as attributes; setting one checks them
    again.

    Example::

        >>> crit = TopKKDLoss(temperature=2.0, soft_weight=0.9, hard_weight=0.1)
        >>> loss = crit(student_logits, stored_indices, stored_values, labels)
    """

    _function = topk_kd_loss
    _extra = ("support", "values")  # (in the signature; kept in self.options, not as attributes)

    def __init__(self, *args, **kwargs):
        torch.nn.Module.__init__(self)
        bound = self.__signature__.bind(*args, **kwargs)
        bound.apply_defaults()
        self._set(bound.arguments)

    def _set(self, kwargs: dict) -> None:
        keywords = {name: kwargs[name] for name in TOPK_OPTION_DEFAULTS}
        self.options = _topk_options(type(self).__name__, keywords)

    def _replace(self, name: str, value) -> None:
        self._set(dict(self.options.kwargs, **{name: value}))

    def extra_repr(self) -> str:
        return self.options.describe()

    def forward(
        self,
        student_logits: torch.Tensor,
        teacher_indices: torch.Tensor,
        teacher_values: torch.Tensor,
        labels: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        _check_tensor_types(student_logits, teacher_indices, teacher_values, labels)
        return _call(student_logits, teacher_indices, teacher_values, labels, self.options)


def _option_property(name: str) -> property:
    return property(
        lambda self: self.options.kwargs[name],
        lambda self, value: self._replace(name, value),
        doc=f"The ``{name}`` option.",
    )


for _name in TOPK_OPTION_DEFAULTS:
    setattr(TopKKDLoss, _name, _option_property(_name))


# ---- storing a teacher ---------------------------------------------------------------------


@torch.no_grad()
def topk_teacher(
    teacher_logits: torch.Tensor,
    k: int,
    rows_per_chunk: Optional[int] = None,
    *,
    temperature: float = 1.0,
    values: str = "logits",
    index_dtype: torch.dtype = torch.int64,
    value_dtype: Optional[torch.dtype] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's ``k`` largest logits per row and their indices, to store for
    :func:`topk_kd_loss`: returns ``(indices, values)``, both ``(..., k)``, each row in
    descending order of value.

    ``values="logits"``: the raw logits there (pass ``values="logits"`` to the loss, which divides
    them by its temperature); ``temperature`` must then be 1. ``values="logprobs"``: the
    teacher's final log-probabilities there, ``log_softmax(teacher_logits / temperature)``
    computed in float32 (float64 for float64 logits), for ``values="logprobs"`` and
    ``support="renormalized"`` or ``"tail"`` (the tail needs the full softmax's mass, which these
    keep). ``index_dtype``: int64 (default) or int32 (half the file; needs ``V < 2**31``).
    ``value_dtype``: default the logits' dtype for logits, float32 for log-probabilities.

    Works in chunks of the first dimension (about ``rows_per_chunk`` rows each, default: 64 MiB of
    logits): a non-contiguous input is never copied whole and no N x V float32 copy of a 16-bit
    input is made (a chunk's, for log-probabilities).
    """
    V = _check_teacher_args(teacher_logits, k, temperature, values, index_dtype, value_dtype)
    if value_dtype is None:
        value_dtype = teacher_logits.dtype if values == "logits" else torch.float32
    out_shape = teacher_logits.shape[:-1] + (k,)
    device = teacher_logits.device
    idx = torch.empty(out_shape, dtype=index_dtype, device=device)
    val = torch.empty(out_shape, dtype=value_dtype, device=device)
    if teacher_logits.dim() == 1:
        _topk_chunk(teacher_logits, k, temperature, values, idx, val)
        return idx, val
    # Chunks of the first dim (topk reads any strides; a chunk that needs a copy is copied alone).
    inner = teacher_logits[0].numel() if teacher_logits.shape[0] else 1
    if rows_per_chunk is None:
        rows_per_chunk = max(1, (64 << 20) // max(1, V * teacher_logits.element_size()))
    step = max(1, rows_per_chunk // max(1, inner // V))
    for a in range(0, teacher_logits.shape[0], step):
        b = min(teacher_logits.shape[0], a + step)
        _topk_chunk(teacher_logits[a:b], k, temperature, values, idx[a:b], val[a:b])
    return idx, val


def _topk_chunk(logits, k, temperature, values, idx_out, val_out) -> None:
    """One chunk of :func:`topk_teacher` into its slices of the outputs."""
    top, where = torch.topk(logits, k, dim=-1, largest=True, sorted=True)
    idx_out.copy_(where)
    if values == "logits":
        val_out.copy_(top)
        return
    # log_softmax(x / T) at the top-k: x_j / T - logsumexp(x / T), in float32 or better (the
    # logits' own 16-bit dtype would round the normaliser); log_softmax is monotonic in x, so
    # the top-k of the logits is the top-k of the log-probabilities, in the same order.
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    lse = torch.logsumexp(logits.to(acc) / temperature, dim=-1, keepdim=True)
    val_out.copy_(top.to(acc) / temperature - lse)


def _check_teacher_args(teacher_logits, k, temperature, values, index_dtype, value_dtype) -> int:
    """topk_teacher's checks; returns V."""
    if not isinstance(teacher_logits, torch.Tensor):
        raise TypeError(
            f"kdfused: teacher_logits must be a tensor, got {type(teacher_logits).__name__}"
        )
    if teacher_logits.dtype not in _FLOATS:
        raise TypeError(
            f"kdfused: teacher_logits must be float16, bfloat16, float32 or float64, "
            f"got {teacher_logits.dtype}"
        )
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"kdfused: k must be an int, got {type(k).__name__}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"kdfused: temperature must be a real number, got {temperature!r}")
    if values not in VALUE_KINDS:
        raise ValueError(f"kdfused: values must be 'logits' or 'logprobs', got {values!r}")
    if index_dtype not in (torch.int64, torch.int32):
        raise TypeError(
            f"kdfused: index_dtype must be torch.int64 or torch.int32, got {index_dtype}"
        )
    if value_dtype is not None and value_dtype not in _FLOATS:
        raise TypeError(
            f"kdfused: value_dtype must be float16, bfloat16, float32 or float64, got {value_dtype}"
        )
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"kdfused: temperature must be finite and > 0, got {temperature}")
    if values == "logits" and temperature != 1:
        # Stored logits are divided by the loss's temperature: dividing here too would apply it
        # twice.
        raise ValueError(
            "kdfused: topk_teacher's temperature is for values='logprobs' (stored logits get the "
            f"loss's temperature), got temperature={temperature} with values='logits'"
        )
    if teacher_logits.dim() < 1:
        raise ValueError("kdfused: teacher_logits must be (..., V)")
    V = teacher_logits.shape[-1]
    if not 1 <= k <= V:
        raise ValueError(f"kdfused: k must be in [1, V = {V}], got {k}")
    if index_dtype == torch.int32 and V > 2**31:
        raise ValueError(f"kdfused: index_dtype=torch.int32 needs V <= 2**31, got V = {V}")
    return V
