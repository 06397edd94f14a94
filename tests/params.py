"""Test parameters shared by the test modules: dtypes, reductions, divergences, the context line
that a failure message ends with."""

from __future__ import annotations

import pytest

from oracle import DTYPE_IDS, DTYPES

DT = [pytest.param(d, id=DTYPE_IDS[d]) for d in DTYPES]
REDUCTIONS = ["batchmean", "mean", "sum", "none"]
# the divergences the fused op has computed from the start, and those added with `beta`
CLASSIC_DIVERGENCES = ["kl", "ce"]
NEW_DIVERGENCES = ["reverse_kl", "jsd", "tvd"]
ERRORS = (ValueError, TypeError, RuntimeError)


def ctx(seed, **kw) -> str:
    """The line a failure message ends with: the test's seed and parameters."""
    return f"\n  [seed={seed} {' '.join(f'{k}={v}' for k, v in kw.items())}]"
