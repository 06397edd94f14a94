"""Smoke test of benchmarks/topk_bench.py: both modes at a tiny size, every support, the fused
loss and the eager peer code (torch.compile is left out: it compiles for tens of seconds)."""

from __future__ import annotations

import json
import os
import sys

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
sys.path.insert(0, BENCH)

import topk_bench  # noqa: E402

pytestmark = pytest.mark.fused_only

SMALL = ["--quick", "--rows", "24", "--vocab", "300", "--hidden", "16", "--ks", "1", "8"]
SMALL += ["--repeat", "1", "--supports", "full", "renormalized", "tail"]


@pytest.mark.parametrize(
    "mode,providers",
    [
        ([], ["topk", "eager", "full_kd"]),
        (["--linear"], ["linear_topk", "linear_eager", "linear_full_kd"]),
    ],
)
def test_topk_bench_smoke(tmp_path, mode, providers):
    stem = str(tmp_path / "bench")
    rows = topk_bench.main(SMALL + mode + ["--providers", *providers, "--out", stem])
    assert len(rows) == 3 * 2  # supports x ks
    for r in rows:
        # The fused loss agrees with the float64 peer code on the same stored teacher.
        assert r["loss_rel_diff_vs_fp64_eager"] < 1e-4, r
        for p in providers:
            assert r[f"{p}_ms"] > 0, (p, r)
    saved = json.load(open(stem + ".json"))
    assert len(saved["results"]) == len(rows)
    assert open(stem + ".csv").readline().startswith("N,V,H,k,support")
