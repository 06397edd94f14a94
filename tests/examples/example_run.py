"""Runs an example script as the smoke tests do: ``--quick --out TMP`` (and any more arguments),
in a fresh interpreter importing this checkout's kdfused; fails with the script's last output
when it does not exit 0."""

from __future__ import annotations

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
