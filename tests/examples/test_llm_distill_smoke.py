"""Smoke test for examples/llm_distill.py --quick (skipped without transformers).

Tiny Llama teacher and student on a few stdlib modules: every way trains (finite losses that fall,
held-out perplexity below the untrained student's), the two kdfused ways (kd_loss on logits,
linear_kd_loss on hidden states, 4 chunks per step) agree with each other and with the eager
formula, and the JSON / Markdown report is written.
"""

from __future__ import annotations

import json
import math

import pytest

from example_run import run_example

pytest.importorskip("transformers")


def test_llm_distill_quick(tmp_path):
    run_example("llm_distill.py", tmp_path)
    with open(tmp_path / "llm_distill.json") as f:
        res = json.load(f)
    assert (tmp_path / "llm_distill.md").read_text().startswith("| model |")

    start = res["student_initial"]["perplexity"]
    assert res["teacher"]["final"]["perplexity"] < start
    for way in ("hard", "kd_loss", "linear"):
        h = res["students"][way]
        losses = h["loss"]
        assert len(losses) == res["config"]["student_steps"]
        assert all(math.isfinite(x) for x in losses), way
        assert sum(losses[-5:]) / 5 < losses[0], (way, losses)
        assert h["final"]["perplexity"] < start, way
        assert h["median_step_seconds"] > 0

    ag = res["agreement"]
    assert ag["first_step_rel_diff"] < 1e-6, ag
    assert ag["first_step_eager_rel_diff"] < 1e-5, ag
    assert ag["max_rel_diff"] < 1e-4, ag
    assert ag["final_max_abs_param_diff"] < 1e-3, ag
    a, b = ag["final_perplexity_kd_loss"], ag["final_perplexity_linear"]
    assert abs(a - b) < 1e-3 * a, ag
