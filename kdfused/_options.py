"""The loss options of every op, checked once per call: :class:`KDOptions` and :func:`parse`.

A call checks its options' Python types and values once, here, and from then on passes one
frozen :class:`KDOptions`: to the op (``op_args`` and friends, in the schemas' orders), to the
vocabulary-parallel exchange (``exchange_code``) and to the modules' ``repr``. The modules build
theirs when they are built and reuse it for every call.

Nothing here imports the compiled extension (``kdfused.reference`` uses the same checks).
"""

from __future__ import annotations

import dataclasses
import functools
import zlib
from typing import Optional

import torch

from ._checks import (
    DIVERGENCES,
    MIXING_DIVERGENCES,
    check_logit_transform,
    check_option_types,
    check_options,
    effective_divergence,
)

# The logit transform's fields, with their defaults (no transform).
TRANSFORM_DEFAULTS = (
    ("student_logit_scale", 1.0),
    ("teacher_logit_scale", 1.0),
    ("student_softcap", None),
    ("teacher_softcap", None),
)


@dataclasses.dataclass(frozen=True)
class KDOptions:
    """The options of a distillation loss, as :func:`kdfused.kd_loss` documents them. Build it
    with :func:`parse` (which checks); the fields are plain floats, ints and strings."""

    temperature: float = 1.0
    soft_weight: float = 1.0
    hard_weight: float = 0.0
    divergence: str = "kl"
    beta: float = 0.5
    ignore_index: int = -100
    reduction: str = "batchmean"
    # The logit transform of each side (z = scale * x, then softcap * tanh(z / softcap)).
    student_logit_scale: float = 1.0
    teacher_logit_scale: float = 1.0
    student_softcap: Optional[float] = None
    teacher_softcap: Optional[float] = None
    # Derived once, here, rather than at every use (the vocabulary-parallel chunk loop asks for
    # them per chunk).
    op_args: tuple = dataclasses.field(init=False, repr=False, compare=False)
    mixes: bool = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self):
        # kdfused::kd_loss, kd_linear_loss and topk_kd_loss (then its support and values) take
        # the options in this order.
        args = (
            self.temperature,
            self.soft_weight,
            self.hard_weight,
            self.divergence,
            self.beta,
            self.ignore_index,
            self.reduction,
            self.logit_map,
        )
        object.__setattr__(self, "op_args", args)
        # Whether the vocabulary-parallel path needs the mixture step: the soft term is on and its
        # divergence (after jsd's end points map to the KLs, as the kernels map them) mixes.
        mixes = (
            self.soft_weight > 0
            and effective_divergence(self.divergence, self.beta) in MIXING_DIVERGENCES
        )
        object.__setattr__(self, "mixes", mixes)

    @property
    def transformed(self) -> bool:
        """Whether either side's logits are transformed (a scale other than 1 or a softcap)."""
        return any(getattr(self, name) != default for name, default in TRANSFORM_DEFAULTS)

    @property
    def logit_map(self) -> tuple:
        """The schemas' ``float[] logit_map``: () without a transform, else (student scale,
        teacher scale, student softcap, teacher softcap) with 0.0 for "no softcap"."""
        if not self.transformed:
            return ()
        return (
            self.student_logit_scale,
            self.teacher_logit_scale,
            self.student_softcap or 0.0,
            self.teacher_softcap or 0.0,
        )

    @property
    def kwargs(self) -> dict:
        """Every option as the keyword arguments of :func:`kdfused.kd_loss` and the other ops."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}

    @property
    def transform_kwargs(self) -> dict:
        """The transform as keyword arguments (``kdfused.reference``'s)."""
        return {name: getattr(self, name) for name, _ in TRANSFORM_DEFAULTS}

    @property
    def loss_args(self) -> tuple:
        """(temperature, soft_weight, hard_weight, divergence, beta): the kd_vp_* ops' order."""
        return self.op_args[:5]

    @property
    def check_args(self) -> tuple:
        """The order of ``_C.check_inputs`` / ``_C.check_options`` (no ignore_index)."""
        return self.op_args[:5] + (self.reduction,)

    def exchange_code(self, *extra) -> int:
        """What the vocabulary-parallel processes compare to agree on the options (and ``extra``,
        e.g. the chunk size): a checksum of their text, which is exact for floats."""
        return zlib.crc32(repr(self.op_args + extra).encode())

    def describe(self, beta: bool = True) -> str:
        """``temperature=..., ..., reduction=...``, as the modules print themselves (the
        transform's fields only where they are not the identity's)."""
        defaults = dict(TRANSFORM_DEFAULTS)
        return ", ".join(
            f"{f.name}={getattr(self, f.name)!r}"
            for f in dataclasses.fields(self)
            if f.repr
            and (beta or f.name != "beta")
            and not (f.name in defaults and getattr(self, f.name) == defaults[f.name])
        )

    def __repr__(self) -> str:
        return f"KDOptions({self.describe()})"


def _parse(who, divergences, check_values, *options) -> KDOptions:
    # The seven loss options, then (optionally) the four of the logit transform.
    check_option_types(who, *options[:7])
    temperature, soft_weight, hard_weight, divergence, beta, ignore_index, reduction = options[:7]
    transform = options[7:] or tuple(default for _, default in TRANSFORM_DEFAULTS)
    check_logit_transform(*transform, values=check_values)
    if check_values:
        values = (temperature, soft_weight, hard_weight, divergence, beta, reduction)
        check_options(*values, divergences)
    numbers = (float(temperature), float(soft_weight), float(hard_weight))
    s_scale, t_scale, s_cap, t_cap = transform
    transform = (
        float(s_scale),
        float(t_scale),
        None if s_cap is None else float(s_cap),
        None if t_cap is None else float(t_cap),
    )
    return KDOptions(*numbers, divergence, float(beta), int(ignore_index), reduction, *transform)


# typed: 1 and 1.0 (and True, which the checks refuse) are different keys. A call that raises
# caches nothing.
_parse_cached = functools.lru_cache(maxsize=256, typed=True)(_parse)


def parse(
    *options, who: str = "kdfused", divergences: tuple = DIVERGENCES, check_values: bool = True
) -> KDOptions:
    """The checked options (``options``: :class:`KDOptions`' fields, in their order): the types
    (TypeError, messages starting with ``who``), then, with ``check_values``, the values
    (ValueError, the C++ op's messages; ``divergences``: the names the op accepts). Cached: a
    training loop passes the same options at every call."""
    if torch.compiler.is_compiling():
        # Traced: the values may be symbolic (dynamic=True), which math.isfinite cannot take;
        # the op checks them when the compiled graph calls it (and its fake kernel at trace time).
        return _parse(who, divergences, False, *options)
    try:
        return _parse_cached(who, divergences, check_values, *options)
    except TypeError:
        pass  # an unhashable option, or a type error: the checks below raise it
    return _parse(who, divergences, check_values, *options)
