"""The package without its compiled extension: ``import kdfused.reference`` (and ``import
kdfused``) must work where ``kdfused._C`` was never built, and the reference must compute the loss
and its gradients; the fused API fails only when used, with an ImportError naming the extension.
Runs in a subprocess whose import system refuses ``kdfused._C``."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = textwrap.dedent(
    """
    import sys

    class HideExtension:
        def find_spec(self, name, path=None, target=None):
            if name == "kdfused._C":
                raise ImportError("kdfused._C is hidden by the test")
            return None

    sys.meta_path.insert(0, HideExtension())

    import torch
    import kdfused.reference as reference

    s = torch.randn(4, 9, dtype=torch.float64, requires_grad=True)
    t = torch.randn(4, 9, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([1, -100, 3, 8])
    for divergence in reference.DIVERGENCES:
        loss = reference.kd_loss(s, t, y, temperature=2.0, soft_weight=0.7, hard_weight=0.3,
                                 divergence=divergence, beta=0.3)
        loss.backward()
        assert torch.isfinite(loss), (divergence, loss)
    assert torch.isfinite(s.grad).all() and (s.grad[1] == 0).all()
    try:
        reference.kd_loss(s, t, y, temperature=0.0)
    except ValueError as exc:
        assert "temperature" in str(exc)
    else:
        raise AssertionError("no error for temperature=0")

    import kdfused
    assert kdfused.reference is reference
    assert "kdfused._C" not in sys.modules, "kdfused imported its extension eagerly"
    try:
        kdfused.kd_loss
    except ImportError as exc:
        assert "kdfused._C" in str(exc), exc
    else:
        raise AssertionError("kdfused.kd_loss without the extension")
    print("reference-ok")
    """
)


def test_reference_without_extension():
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(
            [ROOT] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        ),
    )
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0 and "reference-ok" in proc.stdout, proc.stdout + proc.stderr
