"""Every CUDA launch plan x every divergence, as named tests: the self-test's cases (every dtype
pair, V from 1 to 256000, strided views, ignored rows, masked vocabulary, every reduction) run on
one forced plan against float64, so that a failure names its plan and divergence; the same for
the fused linear op's and the top-k op's paths (cuda:linear, cuda:topk).

Skipped without a GPU; the plan logic itself is tested on the CPU in test_selftest.py.
"""

from __future__ import annotations

import pytest
import torch

from kdfused import _selftest_cases as C
from kdfused import selftest

pytestmark = [
    pytest.mark.fused_only,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"),
]


@pytest.mark.parametrize("divergence", C.DIVERGENCES)
@pytest.mark.parametrize("plan", [*selftest.CUDA_PLANS, "linear", "topk"])
def test_cuda_plan(plan, divergence, seed, capsys):
    if plan.startswith("cluster") and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("thread-block clusters need sm_90")
    path = f"cuda:{plan}"  # (the linear and top-k ops: one path each)
    args = ["--device", "cuda", "--paths", path, "--divergences", divergence, "--quick"]
    rc = selftest.main([*args, "--seed", str(seed)])
    out = capsys.readouterr().out
    fails = [x for x in out.splitlines() if x.startswith(("FAIL", "kdfused self-test"))]
    assert rc == 0, "\n".join(fails[:10]) or out[-2000:]
