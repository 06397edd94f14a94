"""Smoke test of examples/topk_distill.py: the whole pipeline (teacher, stored top-k file of
int32 indices and bfloat16 log-probs, students from hard labels, full logits and the stored file
with the three supports) with --quick."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
sys.path.insert(0, str(EXAMPLES))

import topk_distill  # noqa: E402

TOPK_STUDENTS = {"student_topk_full", "student_topk_renormalized", "student_topk_tail"}


def test_topk_distill_quick(tmp_path):
    store = tmp_path / "teacher_topk.pt"
    out = topk_distill.main(
        ["--quick", "--store", str(store), "--json", str(tmp_path / "out.json")]
    )
    acc = out["accuracy"]
    assert set(acc) == {"teacher", "student_hard", "student_full_kd"} | TOPK_STUDENTS
    # chance is 10%; every model must have learnt something even in the short run (the top-k
    # students see 3 of 10 classes' teacher mass in a 30-epoch run: a lower bar)
    for name, a in acc.items():
        assert a > (0.4 if name in TOPK_STUDENTS else 0.5), (name, a)
    assert set(out["accuracy_minus_full_kd"]) == TOPK_STUDENTS
    saved = torch.load(store)
    assert saved["indices"].dtype == torch.int32 and saved["indices"].shape[-1] == out["k"] == 3
    assert saved["values"].dtype == torch.bfloat16
    assert saved["values"].shape == saved["indices"].shape
    # the stored values are each row's largest log-probs (<= 0), in descending order, whose
    # mass is at most 1
    vals = saved["values"].float()
    assert (vals <= 0).all() and (vals[:, :-1] >= vals[:, 1:]).all()
    assert (vals.exp().sum(-1) <= 1 + 1e-2).all()
    assert json.loads((tmp_path / "out.json").read_text())["k"] == 3
