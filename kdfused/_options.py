"""The loss options of every op, declared once: :class:`KDOptions`, :func:`parse` and
:func:`takes_options`.

The ops take the options as keywords (``**options: Unpack[LossOptions]``, which type checkers
read); :func:`takes_options` gives each op the signature that spells them out, with their types
and defaults, from :class:`KDOptions` (what ``help()``, ``inspect.signature``, the docs and the
modules' constructors show), and :func:`option_values` turns a call's keywords into KDOptions'
order (and :func:`parse_keywords` checks them). A call checks its options' Python types and
values once, here, and from then on passes one frozen :class:`KDOptions`: to the op (``op_args``
and friends, in the schemas' orders), to the vocabulary-parallel exchange (``exchange_code``)
and to the modules' ``repr``. The modules build theirs when they are built and reuse it for
every call.

Nothing here imports the compiled extension (``kdfused.reference`` uses the same checks).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import zlib
from typing import Callable, Optional, TypedDict, TypeVar

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
    return cached_call(_parse_cached, _parse, who, divergences, check_values, *options)


def _from_keywords(who, divergences, check_values, function, /, **keywords) -> KDOptions:
    return _parse(who, divergences, check_values, *option_values(function, keywords))


_from_keywords_cached = functools.lru_cache(maxsize=256, typed=True)(_from_keywords)


def parse_keywords(
    function: str,
    keywords: dict,
    *,
    who: str = "kdfused",
    divergences: tuple = DIVERGENCES,
    check_values: bool = True,
) -> KDOptions:
    """:func:`parse` of the options that a call of ``function`` gave as ``keywords`` (its
    ``**options``); a keyword it does not take raises Python's ``TypeError``."""
    args = (who, divergences, check_values, function)
    return cached_call(_from_keywords_cached, _from_keywords, *args, **keywords)


def cached_call(cached, parser, who, divergences, check_values, /, *args, **keywords):
    """``parser(who, divergences, check_values, *args, **keywords)``, from ``cached`` (its
    ``lru_cache``) where it can be."""
    if torch.compiler.is_compiling():
        # Traced: the values may be symbolic (dynamic=True), which math.isfinite cannot take;
        # the op checks them when the compiled graph calls it (and its fake kernel at trace time).
        return parser(who, divergences, False, *args, **keywords)
    try:
        return cached(who, divergences, check_values, *args, **keywords)
    except TypeError:
        pass  # an unhashable option, or a type error: the checks below raise it
    return parser(who, divergences, check_values, *args, **keywords)


# ---- the options as keywords of the ops --------------------------------------------------------


class LossOptions(TypedDict, total=False):
    """The loss options every op takes as keywords, for type checkers: :class:`KDOptions`' fields
    (the defaults are KDOptions'; a test holds the two to the same names, order and types)."""

    temperature: float
    soft_weight: float
    hard_weight: float
    divergence: str
    beta: float
    ignore_index: int
    reduction: str
    student_logit_scale: float
    teacher_logit_scale: float
    student_softcap: Optional[float]
    teacher_softcap: Optional[float]


class TopKLossOptions(LossOptions, total=False):
    """The options of the top-k ops: kd_loss's, and the support and kind of stored values."""

    support: str
    values: str


# The top-k ops' own two options and their defaults; they come after beta.
TOPK_DEFAULTS = {"support": "full", "values": "logits"}


_KEYWORD = inspect.Parameter.KEYWORD_ONLY


def _option_parameters(extra: dict) -> tuple:
    params = []
    for f in dataclasses.fields(KDOptions):
        if f.init:
            params.append(inspect.Parameter(f.name, _KEYWORD, default=f.default, annotation=f.type))
        if f.name == "beta":
            params += [
                inspect.Parameter(n, _KEYWORD, default=d, annotation="str")
                for n, d in extra.items()
            ]
    return tuple(params)


# The options as the ops' keyword-only parameters, in their order: kd_loss's and linear_kd_loss's,
# and the top-k ops'.
LOSS_PARAMETERS = _option_parameters({})
TOPK_PARAMETERS = _option_parameters(TOPK_DEFAULTS)
LOSS_DEFAULTS = {p.name: p.default for p in LOSS_PARAMETERS}
TOPK_OPTION_DEFAULTS = {p.name: p.default for p in TOPK_PARAMETERS}


_F = TypeVar("_F", bound=Callable)


def takes_options(
    parameters: tuple = LOSS_PARAMETERS, after: Optional[str] = None
) -> Callable[[_F], _F]:
    """Decorates an op that takes its options as ``**options``: its signature (``__signature__``)
    shows them as the keyword-only ``parameters``, after the keyword ``after`` (None: before the
    op's other keywords). The op itself is not wrapped (no cost per call)."""

    def decorate(function: _F) -> _F:
        signature = inspect.signature(function)
        params = [p for p in signature.parameters.values() if p.kind is not p.VAR_KEYWORD]
        names = [p.name for p in params]
        at = (
            names.index(after) + 1
            if after
            else next((i for i, p in enumerate(params) if p.kind is _KEYWORD), len(params))
        )
        function.__signature__ = signature.replace(
            parameters=[*params[:at], *parameters, *params[at:]]
        )
        return function

    return decorate


def option_values(function: str, keywords: dict, defaults: dict = LOSS_DEFAULTS) -> tuple:
    """The options a call of ``function`` gave as ``keywords``, in ``defaults``' order, the
    defaults filled in; for a keyword the op does not take, Python's own ``TypeError``."""
    for name in keywords:
        if name not in defaults:
            raise TypeError(f"{function}() got an unexpected keyword argument '{name}'")
    return tuple([keywords.get(name, default) for name, default in defaults.items()])
