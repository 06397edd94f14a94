"""The CPU kernels' vector exponential (csrc/cpu/kd_vexp.h) on every compiled instruction set:
its error bound against float64 over the whole range the kernels use (x <= 0), and the values
they rely on exactly: exp(0) = 1 (a row's maximum; V = 1 must give loss and gradients 0),
exp(-inf) = 0 (masked logits), NaN stays NaN, and 0 below ln(FLT_MIN)."""

from __future__ import annotations

import math

import pytest
import torch

import kdfused
from kdfused import _C

ISAS = kdfused.build_info()["cpu_isa_compiled"]
# The bound kd_vexp.h states (relative error, x in [ln(FLT_MIN), 0]); the tolerances of the
# kernel tests against float64 rest on it. "scalar" is the C library's expf.
MAX_REL_ERR = 5e-7
LN_FLT_MIN = math.log(torch.finfo(torch.float32).tiny)


@pytest.mark.parametrize("isa", ISAS)
def test_relative_error_bound(isa, gen):
    grid = torch.linspace(LN_FLT_MIN, 0.0, 1_000_003)
    # plus fresh random points (seed printed on failure), with small arguments densely covered
    rand = torch.cat(
        [torch.rand(500_000, generator=gen) * LN_FLT_MIN, -torch.rand(500_000, generator=gen)]
    )
    x = torch.cat([grid, rand])
    y = _C.cpu_exp(x, isa)
    ref = torch.exp(x.double())
    rel = ((y.double() - ref) / ref).abs()
    worst = int(rel.argmax())
    assert rel[worst] <= MAX_REL_ERR, (
        f"x={x[worst].item()!r}: {y[worst].item()!r} vs {ref[worst].item()!r}"
    )


@pytest.mark.parametrize("isa", ISAS)
def test_exact_values(isa):
    inf = float("inf")
    x = torch.tensor([0.0, -0.0, -inf, -88.0, -100.0, -1e30, float("nan")])
    y = _C.cpu_exp(x, isa)
    assert y[0].item() == 1.0 and y[1].item() == 1.0
    assert y[2].item() == 0.0
    # the vector exponential flushes to 0 below ln(FLT_MIN), the C library's gives denormals
    assert (y[3:6] <= torch.finfo(torch.float32).tiny).all()
    assert math.isnan(y[6].item())
    # every lane position of a vector, not only the first (at::vec widths up to 16)
    for lane in range(17):
        z = torch.full((17,), -3.0)
        z[lane] = 0.0
        assert _C.cpu_exp(z, isa)[lane].item() == 1.0


@pytest.mark.parametrize("isa", ISAS)
def test_at_most_one(isa):
    # No probability may exceed its row maximum's: exp(x) <= 1 for every x <= 0.
    x = -torch.arange(0, 200_000, dtype=torch.float32) * 2.0**-24
    assert (_C.cpu_exp(x, isa) <= 1).all()
