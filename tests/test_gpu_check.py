"""The helpers of benchmarks/gpu_check.sh, checked without a GPU: which tests run one per
process, how a compute-sanitizer run is judged, and the verdict and exit status of summary.md."""

from __future__ import annotations

import importlib.util
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name):
    spec = importlib.util.spec_from_file_location(
        name, os.path.join(ROOT, "benchmarks", f"{name}.py")
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


steps = _load("gpu_steps")
summary = _load("gpu_summary")


@pytest.mark.parametrize(
    "test_id, isolated",
    [
        ("tests/test_inputs.py::test_bad_input[cuda-labels-too-big]", True),
        ("tests/test_inputs.py::test_bad_input[cuda-labels-negative]", True),
        ("tests/test_inputs.py::test_bad_input[cuda-labels-shape-2d]", False),
        ("tests/test_inputs.py::test_bad_input[cuda-labels-float]", False),
        ("tests/test_inputs.py::test_bad_input[cpu-labels-too-big]", False),
        ("tests/test_kd_loss.py::test_matches_oracle[cuda-kl]", False),
    ],
)
def test_device_assert_tests_are_isolated(test_id, isolated):
    assert bool(steps.DEVICE_ASSERT.search(test_id)) == isolated


@pytest.mark.parametrize(
    "rc, lines, start",
    [
        (0, ["========= ERROR SUMMARY: 0 errors"], "ok"),
        (
            0,
            [
                "========= RACECHECK SUMMARY: 0 hazards displayed (0 errors, 0 warnings)",
                "========= ERROR SUMMARY: 0 errors",
            ],
            "ok",
        ),
        (
            9,
            [
                "========= Invalid __global__ read of size 4 bytes",
                "========= ERROR SUMMARY: 1 error",
            ],
            "ERRORS FOUND",
        ),
        (
            9,
            ["========= Error: Race reported between Write access at kd_block_kernel"],
            "ERRORS FOUND",
        ),
        (
            1,
            ["kdfused self-test FAILED: 2 failure(s)", "========= ERROR SUMMARY: 0 errors"],
            "FAILED under the tool",
        ),
        ("timeout", ["kdfused self-test  seed 5"], "TIMEOUT after 90 s, no errors"),
        (
            "timeout",
            ["========= Invalid __shared__ write of size 16 bytes"],
            "TIMEOUT after 90 s: 1",
        ),
    ],
)
def test_sanitizer_verdict(rc, lines, start):
    verdict, _ = steps.sanitizer_verdict(rc, 90, lines)
    assert verdict.startswith(start), verdict


def _summary(tmp_path, mode, rows):
    work, out = tmp_path / "work", tmp_path / "out"
    work.mkdir(parents=True)
    out.mkdir(parents=True)
    (work / "steps.tsv").write_text("".join("\t".join(r) + "\n" for r in rows))
    (work / "env.log").write_text("git: abc123\ndevice NVIDIA H200 sm_90\n")
    code = summary.main(["gpu_summary.py", str(work), str(out), mode])
    return code, (out / "summary.md").read_text()


OK = [("env", "0", "3", "60"), ("build", "0", "100", "200"), ("selftest", "0", "40", "120")]


def test_summary_exit_status(tmp_path, capsys):
    assert _summary(tmp_path / "a", "gpu", OK)[0] == 0
    code, md = _summary(tmp_path / "b", "gpu", OK + [("pytest", "124", "120", "120")])
    assert code == 1 and "FAIL: pytest" in md and "TIMEOUT" in md
    code, md = _summary(tmp_path / "c", "gpu", OK + [("sanitizer", "3", "5", "90")])
    assert code == 0 and "| sanitizer | n/a |" in md  # tool unavailable: said, not a failure
    code, md = _summary(tmp_path / "d", "gpu", OK + [("bench", "skip:the budget was spent")])
    assert code == 1 and "not run" in md
    code, md = _summary(tmp_path / "e", "nogpu", OK)
    assert code == 3 and "NO GPU PRESENT" in md
    code, md = _summary(tmp_path / "f", "nogpu", OK + [("import", "1", "2", "60")])
    assert code == 1 and "FAILED" in md
    assert "kdfused GPU check" in capsys.readouterr().out  # printed as well


def test_own_test_ids_are_not_isolated():
    tid = (
        "tests/test_gpu_check.py::test_device_assert_tests_are_isolated["
        "tests/test_inputs.py::test_bad_input[cuda-labels-too-big]-True]"
    )
    assert not steps.DEVICE_ASSERT.search(tid)
