"""Smoke test for examples/hf_trainer_distill.py --quick (skipped without transformers).

Tiny Llama and Gemma 2 (softcapped) teachers and students on a few stdlib modules, trained with
transformers' Trainer and kdfused's KDTrainer: every loss finite and falling, every trained
model's held-out perplexity below the untrained student's, the JSON / Markdown report written.
"""

from __future__ import annotations

import pytest

from example_run import assert_trained, run_example_report

pytest.importorskip("transformers")


def test_hf_trainer_distill_quick(tmp_path):
    res = run_example_report("hf_trainer_distill.py", tmp_path, "hf_trainer_distill", "| family |")
    assert set(res["families"]) == {"llama", "gemma2"}
    cfg = res["config"]
    for family, r in res["families"].items():
        start = r["student_initial"]["perplexity"]
        t = r["teacher"]
        assert len(t["loss"]) == cfg["teacher_steps"], family
        assert t["final"]["perplexity"] < start, family
        for way in ("hard", "distilled"):
            assert_trained(r["students"][way], cfg["student_steps"], start, (family, way))
