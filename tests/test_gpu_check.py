"""The GPU check's harness (benchmarks/gpu_check.sh), checked without a GPU: the driver's time
boxes and verdicts (with stand-in steps that pass, fail, hang and crash), summary.md and its exit
status, how a compute-sanitizer run is judged, the pytest plugin's error lines, the benchmark's
budget plan and split, and the fused linear benchmark's part of the bench step (rehearsed on a
tiny CPU case: its rows reach summary.md). The whole choreography is rehearsed by CI
(GPU_CHECK_REHEARSAL=1)."""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")


def _load(name):
    if BENCH not in sys.path:
        sys.path.insert(0, BENCH)
    spec = importlib.util.spec_from_file_location(name, os.path.join(BENCH, f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # (dataclasses look their module up there)
    spec.loader.exec_module(mod)
    return mod


steps = _load("gpu_steps")
summary = _load("gpu_summary")
driver = _load("gpu_check")
plugin = _load("_gpu_pytest_plugin")


@pytest.mark.parametrize(
    "rc, lines, state",
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
            "errors",
        ),
        (9, ["========= Error: Race reported between Write access at kd_block_kernel"], "errors"),
        (
            1,
            ["kdfused self-test FAILED: 2 failure(s)", "========= ERROR SUMMARY: 0 errors"],
            "failed",
        ),
        ("timeout", ["kdfused self-test  seed 5"], "inconclusive"),
        ("timeout", ["========= Invalid __shared__ write of size 16 bytes"], "errors"),
    ],
)
def test_sanitizer_verdict(rc, lines, state):
    got, text, _ = steps.sanitizer_verdict(rc, 90, lines)
    assert got == state, text


FAKE_STEPS = r"""
import sys, time
step, report = sys.argv[1], sys.argv[2]
open(report, "w").write(f"working\nRESULT: {step} said this\n")
if step == "hangs":
    time.sleep(60)
if step == "fails":
    sys.exit(1)
if step == "na":
    sys.exit(3)
if step == "crashes":
    raise RuntimeError("boom")
"""


def test_driver_boxes_verdicts_and_summary(tmp_path, monkeypatch, capsys):
    fake = tmp_path / "fake_steps.py"
    fake.write_text(FAKE_STEPS)
    monkeypatch.setattr(driver, "STEP_SCRIPT", str(fake))
    monkeypatch.setattr(driver, "GRACE_S", 1)
    monkeypatch.setattr(driver, "_gpu_present", lambda: True)
    S = driver.Step
    plan = [
        S("passes", "a step that passes", 20, 1),
        S("hangs", "a step that hangs", 3, 1),
        S("fails", "a step that fails", 20, 1),
        S("na", "a step without its tool", 20, 1),
        S("crashes", "a step that raises", 20, 1),
        S("after", "needs the hanging step", 20, 1, ("hangs",)),
    ]
    monkeypatch.setattr(driver, "steps_for", lambda mode: plan)
    monkeypatch.setenv("GPU_CHECK_BUDGET_S", "120")
    monkeypatch.delenv("GPU_CHECK_REHEARSAL", raising=False)
    out = tmp_path / "out"
    code = driver.main(["gpu_check.py", str(out)])
    status = {s.name: s.status for s in plan}
    assert status == {
        "passes": "ok",
        "hangs": "timed out",
        "fails": "FAILED",
        "na": "n/a",
        "crashes": "FAILED",
        "after": "not run",
    }
    assert code == 1
    md = (out / "summary.md").read_text()
    assert md.startswith("# kdfused GPU check: FAIL: hangs, fails, crashes, after\n")
    assert "passes said this" in md and "killed at the end of its 3 s box" in md
    assert "| na | n/a |" in md and "needs hangs" in md
    assert sorted(os.listdir(out)) == ["logs.tar.gz", "summary.md"]
    printed = capsys.readouterr().out
    assert "[hangs] a step that hangs; time box 3 s" in printed and "[hangs] timed out" in printed


def test_driver_budget_spent(tmp_path, monkeypatch):
    fake = tmp_path / "fake_steps.py"
    fake.write_text(FAKE_STEPS)
    monkeypatch.setattr(driver, "STEP_SCRIPT", str(fake))
    monkeypatch.setattr(driver, "MIN_BOX", 2)
    monkeypatch.setattr(driver, "_gpu_present", lambda: False)
    plan = [driver.Step("hangs", "", 3, 1), driver.Step("late", "", 20, 1)]
    monkeypatch.setattr(driver, "steps_for", lambda mode: plan)
    monkeypatch.setenv("GPU_CHECK_BUDGET_S", "4")
    monkeypatch.setenv("GPU_CHECK_REHEARSAL", "1")
    assert driver.main(["gpu_check.py", str(tmp_path / "out")]) == 1
    assert [s.status for s in plan] == ["timed out", "not run"]
    md = (tmp_path / "out" / "summary.md").read_text()
    assert "REHEARSAL FAILED: hangs, late" in md and "the budget of 4 s was spent" in md


def test_summary_modes(tmp_path):
    S = driver.Step
    ok = [S("env", "", 1, 1, status="ok"), S("sanitizer", "", 1, 1, status="inconclusive")]
    (tmp_path / "pytest.txt").write_text("x\nF tests/t.py::test_a[cuda] -- E   assert 1 == 2\n")
    assert summary.write(str(tmp_path), str(tmp_path), "gpu", ok, 500, 10) == 0
    md = (tmp_path / "summary.md").read_text()
    assert "PASS" in md and "tests/t.py::test_a[cuda] -- E   assert 1 == 2" in md
    assert summary.write(str(tmp_path), str(tmp_path), "rehearsal", ok, 500, 10) == 0
    assert "REHEARSAL PASSED" in (tmp_path / "summary.md").read_text()
    bad = ok + [S("bench", "", 1, 1, status="timed out"), S("x", "", 1, 1)]
    assert summary.write(str(tmp_path), str(tmp_path), "gpu", bad, 500, 10, "stopped") == 1
    md = (tmp_path / "summary.md").read_text()
    assert "FAIL: bench" in md and "still running or was stopped" in md and "**stopped**" in md


def test_plugin_first_error_line():
    text = "def test():\n>   assert f() == 3\nE   assert 2 == 3\nE    +  where 2 = f()\n"
    assert plugin.first_error_line(text) == "E   assert 2 == 3"
    assert plugin.first_error_line("RuntimeError: CUDA error\n\n") == "RuntimeError: CUDA error"


@pytest.mark.parametrize("budget", [60, 120, 300])
def test_bench_plan_fits_the_budget(budget):
    providers = ["kdfused", "eager", "compile", "liger_kl"]
    cases, compiled, timeout = steps.bench_plan(budget, providers)
    c = steps.BENCH_COST_S
    cost = (2 + len(providers)) * c["start"] + 3 * len(cases) * c["case"]
    cost += len(compiled) * c["compile_case"]
    assert cost <= max(budget, cost - len(compiled) * c["compile_case"])
    assert compiled == cases[: len(compiled)]  # the most interesting first
    assert timeout >= 10


@pytest.mark.parametrize("budget", [40, 60, 112, 172, 400])
def test_bench_split_keeps_run_py_first(budget):
    providers = steps.linear_providers()
    first, linear = steps.bench_split(budget, providers)
    assert first + linear == budget and first >= steps.RUN_PY_SHARE * budget
    assert linear == 0 or linear >= steps.LINEAR_MIN_S
    if budget >= 112:  # the default box leaves the linear part a share of its own
        assert linear > 0


def test_linear_providers_are_the_importable_ones():
    got = steps.linear_providers()
    assert {"kdfused-linear", "kdfused-trl", "kdfused"} <= set(got) <= set(steps.LINEAR_PROVIDERS)
    assert ("trl" in got) == steps.have("trl") and ("liger" in got) == steps.have("liger_kernel")


def test_linear_rehearsal_rows_reach_the_summary(tmp_path):
    """The bench step's second part, rehearsed: linear_bench.py on a tiny CPU case writes its
    rows where the step and summary.md read them."""
    import subprocess

    out = tmp_path / "bench"
    cmd = steps.linear_cmd(str(out), True, 120, ["kdfused-linear", "kdfused-trl"])
    assert cmd[cmd.index("--device") + 1] == "cpu" and "--soft-only" in cmd
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    rows, text, ours_failed = steps.linear_result(str(out))
    assert [x["provider"] for x in rows] == ["kdfused-linear", "kdfused-trl"]
    assert all("ms" in x and x["peak_source"] in ("VmHWM", "ru_maxrss") for x in rows)
    assert text.startswith("2 of 2 providers timed") and not ours_failed
    assert (out / "linear.csv").read_text().count("\n") == 3
    md = summary.linear_table(str(tmp_path), "rehearsal")
    assert any(x.startswith("| kdfused-trl | ") for x in md) and "256,64,1000" in md[1]
    assert "the numbers mean nothing" in md[1] and "losses agree" in md[-1]


def test_linear_table_and_result_with_a_timeout(tmp_path):
    import json

    rows = [
        dict(provider="kdfused-linear", ms=12.5, peak_mib=130.2, loss=0.25, device_name="H100"),
        dict(provider="trl", status="timeout", error=["stopped after 20 s"]),
        dict(provider="kdfused", status="error", error=["RuntimeError: CUDA out of memory"]),
    ]
    for x in rows:
        x.update(N=4096, H=1024, V=32000, dtype="float32", device="cuda")
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "linear.json").write_text(json.dumps(dict(meta={}, rows=rows)))
    md = summary.linear_table(str(tmp_path), "gpu")
    assert "(H100, N,H,V = 4096,1024,32000 float32" in md[1] and "mean nothing" not in md[1]
    assert "| kdfused-linear | 12.50 | 130 | 0.25 |" in md
    assert "| trl | timeout stopped after 20 s | - | - |" in md
    _, text, ours_failed = steps.linear_result(str(tmp_path / "bench"))
    assert text == "1 of 3 providers timed (trl timeout, kdfused error)" and ours_failed
    assert summary.linear_table(str(tmp_path / "nothing"), "gpu") == []


def test_linear_bench_provider_timeout():
    lb = _load("linear_bench")
    r = lb.run_one("kdfused-linear", 64, 32, 500, "float32", 1, "jsd", True, "cpu", timeout=0.2)
    assert r["status"] == "timeout" and r["error"] == ["stopped after 0.2 s"]


def test_outdir_files_documented():
    with open(os.path.join(BENCH, "gpu_check.sh")) as f:
        header = f.read()
    assert f"OUTDIR gets {len(driver.OUT_FILES)} files" in header
    for name in driver.OUT_FILES:
        assert name in header, name


def test_curated_tests_exist():
    for _, files in steps.CUDA_TESTS:
        for f in files:
            assert os.path.isfile(os.path.join(ROOT, f)), f


def test_runtime_compare_zero_tolerance_fails_on_any_difference():
    import torch

    runtime = _load("gpu_runtime")
    a = torch.tensor([1.0, 2.0, 3.0])
    b = torch.tensor([1.0, 2.0000002, 3.0])
    assert runtime.compare([("x", a, b)], 0.0, 0.0)[0] is False
    assert runtime.compare([("x", a, a.clone())], 0.0, 0.0) == (True, "bitwise equal")
    assert runtime.compare([("x", a, b)], 1e-5, 1e-7)[0] is True
    assert runtime.compare([("x", a, a * float("nan"))], 1.0, 1.0)[0] is False
