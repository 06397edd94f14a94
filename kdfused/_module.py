"""The base of the loss modules (:class:`kdfused.KDLoss` and its kin): options checked once."""

from __future__ import annotations

import dataclasses

from torch import nn

from ._checks import DIVERGENCES
from ._options import KDOptions, parse


class OptionsModule(nn.Module):
    """A loss module whose options are checked when it is built, as its function checks them at
    every call, and then kept as one :class:`KDOptions` (``self.options``) that every call reuses.
    The options read as attributes (``crit.temperature``); setting one checks the options again."""

    _who = "kdfused"  # starts the type errors' messages
    _divergences = DIVERGENCES  # the names the op accepts

    def __init__(self, *options):
        super().__init__()
        self.options = parse(*options, self._who, self._divergences)

    def _replace(self, name: str, value) -> None:
        values = [value if n == name else getattr(self.options, n) for n in _NAMES]
        self.options = parse(*values, self._who, self._divergences)


def _option_property(name: str) -> property:
    return property(
        lambda self: getattr(self.options, name),
        lambda self, value: self._replace(name, value),
        doc=f"The ``{name}`` option.",
    )


_NAMES = tuple(f.name for f in dataclasses.fields(KDOptions) if f.init)  # parse()'s order
for _name in _NAMES:
    setattr(OptionsModule, _name, _option_property(_name))
