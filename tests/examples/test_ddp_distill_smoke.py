"""examples/ddp_distill.py under torchrun with 2 processes (gloo on CPU): a few float64 steps, then
--check compares the DDP-trained parameters with one process trained on the whole batches."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "ddp_distill.py"


@pytest.mark.fused_only
@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="no gloo")
def test_ddp_two_processes_train_like_one():
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    cmd += [str(EXAMPLE), "--steps", "6", "--batch", "64", "--classes", "50", "--hidden", "32"]
    cmd += ["--float64", "--check"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(EXAMPLE.parents[1]))
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-4000:]
    assert "max relative difference" in out, out[-4000:]
    assert "2 processes, 6 steps" in out, out[-4000:]
