"""Smoke test for examples/trl_distill.py --quick (skipped without trl).

TRL's DistillationTrainer with its own loss and with kdfused's (kdfused.integrations.trl), tiny
Llama student and teacher, 3 steps each in its own process: both sample the same completions,
their per-step losses agree (the script asserts it too), every step is timed and measured, and
the JSON / Markdown report is written.
"""

from __future__ import annotations

import math

import pytest

from example_run import run_example_report

pytest.importorskip("trl")


def test_trl_distill_quick(tmp_path):
    res = run_example_report("trl_distill.py", tmp_path, "trl_distill_quick", "| step |")

    steps = res["config"]["steps"]
    ways = res["ways"]
    assert ways["kdfused"]["trainer"] == "kdfused.integrations.trl.DistillationTrainer"
    assert ways["trl"]["trainer"] == "trl.trainer.distillation_trainer.DistillationTrainer"
    for way in ("trl", "kdfused"):
        w = ways[way]
        assert len(w["loss"]) == len(w["steps"]) == steps, way
        assert all(math.isfinite(x) and x > 0 for x in w["loss"]), (way, w["loss"])
        assert all(s["seconds"] > 0 and s["loss_forward_seconds"] > 0 for s in w["steps"]), way
        assert all(s["loss_backward_seconds"] > 0 for s in w["steps"]), way
        assert sum(w["completion_tokens"]) > 0
        assert res["summary"][way]["median_step_seconds"] > 0

    ag = res["agreement"]
    assert ag["same_completions"], ag
    assert ag["max_rel_loss_diff"] < 1e-5, ag
