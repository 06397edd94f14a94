"""Smoke test for examples/llm_distill.py: the three ways agree (skipped without transformers)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("transformers")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_llm_distill_three_ways_agree():
    out = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "examples", "llm_distill.py"),
            "--steps",
            "2",
            "--vocab",
            "500",
            "--seq",
            "16",
            "--batch",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "first-step losses agree" in out.stdout
    lines = [ln for ln in out.stdout.splitlines() if "losses" in ln and ":" in ln]
    assert len(lines) == 3, out.stdout
