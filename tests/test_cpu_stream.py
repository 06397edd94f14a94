"""Large CPU gradients are written with non-temporal stores (csrc/cpu/kd_cpu_dispatch.h,
stream_grad_stores): the values must be bitwise those of ordinary stores. The test sizes are far
below the automatic threshold, so a second process forces the streaming path
(KDFUSED_CPU_STREAM_STORES=1) on every compiled instruction set and its results are compared
with this process's (ordinary stores)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import kdfused

ISAS = kdfused.build_info()["cpu_isa_compiled"]

# Rows a whole number of 64-byte lines long (streamed) and not (every chunk after the first row's
# misaligned: ordinary stores there); many rows (one per thread) and one row split over threads.
CASES = [
    (9, 5 * 2048, torch.float32),
    (7, 2 * 2048 + 13, torch.float32),
    (1, 6 * 2048, torch.float32),
    (5, 3 * 2048, torch.bfloat16),
    (4, 2 * 2048 + 16, torch.float64),
]
DIVERGENCES = ["kl", "ce", "reverse_kl", "jsd", "tvd"]

# The second process runs this module's _run on the saved cases.
_SCRIPT = r"""
import sys, torch
sys.path.insert(0, sys.argv[2])
from test_cpu_stream import _run
torch.save(_run(torch.load(sys.argv[1])), sys.argv[1] + ".out")
"""


def _cases(seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    cases = []
    for N, V, dtype in CASES:
        for div in DIVERGENCES:
            s = (torch.randn(N, V, generator=g) * 3).to(dtype)
            t = (torch.randn(N, V, generator=g) * 3).to(dtype)
            t[0, : V // 4] = float("-inf")  # a masked teacher vocabulary
            if div == "reverse_kl":
                s[0, : V // 4] = float("-inf")  # (else the divergence is +inf)
            y = torch.randint(0, V, (N,), generator=g)
            y[0] = V - 1
            kw = dict(temperature=2.0, hard_weight=0.3, divergence=div, beta=0.4)
            cases.append(dict(s=s, t=t, y=y, kw=kw))
    return cases


def _run(cases: list[dict]) -> list[tuple]:
    out = []
    for c in cases:
        s = c["s"].clone().requires_grad_()
        t = c["t"].clone().requires_grad_()
        loss = kdfused.kd_loss(s, t, c["y"], **c["kw"])
        loss.backward()
        out.append((loss.detach(), s.grad, t.grad))
    return out


@pytest.mark.fused_only
@pytest.mark.parametrize("isa", ISAS, indirect=True)
def test_streamed_gradients_are_bitwise_the_stored_ones(isa, seed, tmp_path):
    cases = _cases(seed)
    path = str(tmp_path / "cases.pt")
    torch.save(cases, path)
    env = dict(os.environ, KDFUSED_CPU_STREAM_STORES="1", KDFUSED_CPU_ISA=isa)
    proc = subprocess.run(
        [sys.executable, "-c", _SCRIPT, path, os.path.dirname(os.path.abspath(__file__))],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    streamed = torch.load(path + ".out")
    stored = _run(cases)  # (the isa fixture forces the same instruction set here)
    assert len(streamed) == len(stored) == len(CASES) * len(DIVERGENCES)
    for i, (a, b) in enumerate(zip(streamed, stored)):
        for name, x, z in zip(("loss", "grad_student", "grad_teacher"), a, b):
            assert torch.isfinite(z).all(), (i, name)
            assert torch.equal(x, z), (i, name, cases[i]["kw"], tuple(cases[i]["s"].shape))
