"""Runs an example script as the smoke tests do: ``--quick --out TMP`` (and any more arguments),
in a fresh interpreter importing this checkout's kdfused; fails with the script's last output
when it does not exit 0. Also what the smoke tests check alike in the reports written."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_example(script: str, out_dir, *args: str, timeout: float = 600) -> None:
    env = dict(os.environ)
    # this checkout's kdfused, whatever the interpreter has installed
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
    cmd = [sys.executable, os.path.join(ROOT, "examples", script), "--quick", "--out", str(out_dir)]
    out = subprocess.run(cmd + list(args), capture_output=True, text=True, timeout=timeout, env=env)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]


def run_example_report(script: str, out_dir, report: str, table_head: str) -> dict:
    """run_example, then the report it wrote: OUT/<report>.md, a table whose first line starts
    with ``table_head``, and OUT/<report>.json, returned."""
    run_example(script, out_dir)
    with open(os.path.join(out_dir, f"{report}.json")) as f:
        res = json.load(f)
    with open(os.path.join(out_dir, f"{report}.md")) as f:
        assert f.read().startswith(table_head)
    return res


def assert_trained(run: dict, steps: int, untrained_perplexity: float, what) -> None:
    """One trained model's record: `steps` finite losses, the last five's mean below the first,
    and a held-out perplexity below the untrained student's."""
    losses = run["loss"]
    assert len(losses) == steps, what
    assert all(math.isfinite(x) for x in losses), what
    assert sum(losses[-5:]) / 5 < losses[0], (what, losses)
    assert run["final"]["perplexity"] < untrained_perplexity, what
