"""Smoke test for examples/llm_distill.py --quick (skipped without transformers).

Tiny Llama teacher and student on a few stdlib modules: every way trains (finite losses that fall,
held-out perplexity below the untrained student's), the two kdfused ways (kd_loss on logits,
linear_kd_loss on hidden states, 4 chunks per step) agree with each other and with the eager
formula, and the JSON / Markdown report is written.
"""

from __future__ import annotations

import pytest

from example_run import assert_trained, run_example_report

pytest.importorskip("transformers")


def test_llm_distill_quick(tmp_path):
    res = run_example_report("llm_distill.py", tmp_path, "llm_distill", "| model |")
    start = res["student_initial"]["perplexity"]
    assert res["teacher"]["final"]["perplexity"] < start
    for way in ("hard", "kd_loss", "linear"):
        h = res["students"][way]
        assert_trained(h, res["config"]["student_steps"], start, way)
        assert h["median_step_seconds"] > 0
    ag = res["agreement"]
    assert ag["first_step_rel_diff"] < 1e-6, ag
    assert ag["first_step_eager_rel_diff"] < 1e-5, ag
    assert ag["max_rel_diff"] < 1e-4, ag
    assert ag["final_max_abs_param_diff"] < 1e-3, ag
    a, b = ag["final_perplexity_kd_loss"], ag["final_perplexity_linear"]
    assert abs(a - b) < 1e-3 * a, ag
