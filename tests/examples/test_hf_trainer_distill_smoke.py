"""Smoke test for examples/hf_trainer_distill.py --quick (skipped without transformers).

Tiny Llama and Gemma 2 (softcapped) teachers and students on a few stdlib modules, trained with
transformers' Trainer and kdfused's KDTrainer: every loss finite and falling, every trained
model's held-out perplexity below the untrained student's, the JSON / Markdown report written.
"""

from __future__ import annotations

import json
import math

import pytest

from example_run import run_example

pytest.importorskip("transformers")


def test_hf_trainer_distill_quick(tmp_path):
    run_example("hf_trainer_distill.py", tmp_path)
    with open(tmp_path / "hf_trainer_distill.json") as f:
        res = json.load(f)
    assert (tmp_path / "hf_trainer_distill.md").read_text().startswith("| family |")

    assert set(res["families"]) == {"llama", "gemma2"}
    cfg = res["config"]
    for family, r in res["families"].items():
        start = r["student_initial"]["perplexity"]
        t = r["teacher"]
        assert len(t["loss"]) == cfg["teacher_steps"], family
        assert t["final"]["perplexity"] < start, family
        for way in ("hard", "distilled"):
            h = r["students"][way]
            losses = h["loss"]
            assert len(losses) == cfg["student_steps"], (family, way)
            assert all(math.isfinite(x) for x in losses), (family, way)
            assert sum(losses[-5:]) / 5 < losses[0], (family, way, losses)
            assert h["final"]["perplexity"] < start, (family, way)
