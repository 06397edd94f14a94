"""The base of the loss modules (:class:`kdfused.KDLoss` and its kin): options checked once."""

from __future__ import annotations

import dataclasses
import inspect

from torch import nn

from ._checks import DIVERGENCES
from ._options import KDOptions, parse

_NAMES = tuple(f.name for f in dataclasses.fields(KDOptions) if f.init)  # parse()'s order


class OptionsModule(nn.Module):
    """A loss module: the keyword options of its function (``_function``), taken by the
    constructor in the same order and with the same defaults (positionally too), checked when the
    module is built as the function checks them at every call, and kept as one
    :class:`KDOptions` (``self.options``) that every call reuses. The options read as attributes
    (``crit.temperature``); setting one checks them again. The function's other keywords that are
    not tensors (``_extra``: ``process_group``, ``chunk_size``) are plain attributes."""

    _function = None
    _extra: tuple = ()
    _who = "kdfused"  # starts the type errors' messages
    _divergences = DIVERGENCES  # the names the op accepts

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls._function is None:
            return
        params = inspect.signature(cls._function).parameters.values()
        cls.__signature__ = inspect.Signature(
            [
                p.replace(kind=inspect.Parameter.POSITIONAL_OR_KEYWORD)
                for p in params
                if p.kind is inspect.Parameter.KEYWORD_ONLY
                and (p.name in _NAMES or p.name in cls._extra)
            ]
        )

    def __init__(self, *args, **kwargs):
        super().__init__()
        bound = self.__signature__.bind(*args, **kwargs)
        bound.apply_defaults()
        values = bound.arguments
        # beta where an op has none: the neutral default, which every check accepts.
        self._set_options([values.get(n, KDOptions.beta) for n in _NAMES])
        for name in self._extra:
            setattr(self, name, values[name])

    def _set_options(self, values) -> None:
        self.options = parse(*values, who=self._who, divergences=self._divergences)

    def _replace(self, name: str, value) -> None:
        self._set_options([value if n == name else getattr(self.options, n) for n in _NAMES])

    def extra_repr(self) -> str:
        return self.options.describe(beta="beta" in self.__signature__.parameters)


def _option_property(name: str) -> property:
    return property(
        lambda self: getattr(self.options, name),
        lambda self, value: self._replace(name, value),
        doc=f"The ``{name}`` option.",
    )


for _name in _NAMES:
    setattr(OptionsModule, _name, _option_property(_name))
