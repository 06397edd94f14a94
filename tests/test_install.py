"""The package as installed: the version, the build record, and the check that refuses to load the
extension into a torch other than the one it was built against.

The mismatch is simulated on a copy of the package whose recorded torch version is edited: the
import of ``kdfused._C`` must raise an ImportError naming both versions and the rebuild command,
before the shared library is opened. Runs on the installed package as well as on a checkout."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

import kdfused
from kdfused import _extension

PACKAGE_DIR = os.path.dirname(os.path.abspath(kdfused.__file__))
CHANGELOG = os.path.join(os.path.dirname(PACKAGE_DIR), "CHANGELOG.md")
FAKE_TORCH = "2.3.0+fake999"


def test_version():
    assert re.fullmatch(r"\d+\.\d+\.\d+", kdfused.__version__), kdfused.__version__


@pytest.mark.skipif(not os.path.exists(CHANGELOG), reason="not a checkout")
def test_changelog_has_this_version():
    with open(CHANGELOG, encoding="utf-8") as f:
        assert f"## {kdfused.__version__}\n" in f.read()


def test_build_info_reports_the_build():
    info = kdfused.build_info()
    assert info["torch"] == str(torch.__version__), info
    assert info["torch_cuda"] == torch.version.cuda
    public = str(torch.__version__).split("+")[0]
    target = "cu" + torch.version.cuda.replace(".", "") if info["cuda"] else "cpu"
    assert info["version"] == f"{kdfused.__version__}+torch{public}.{target}", info
    assert (info["cuda_arch_list"] is not None) == info["cuda"]


def _copy_package(dest: str, torch_version: str | None = None) -> str:
    """A copy of the built package in `dest` (the extension linked, not copied), with the recorded
    torch version replaced by `torch_version`."""
    pkg = os.path.join(dest, "kdfused")
    shutil.copytree(
        PACKAGE_DIR, pkg, ignore=shutil.ignore_patterns("__pycache__", "_C.*", "_build_meta.py")
    )
    for name in os.listdir(PACKAGE_DIR):
        if name.startswith("_C."):
            os.symlink(os.path.join(PACKAGE_DIR, name), os.path.join(pkg, name))
    record = _extension.build_record()
    assert record is not None, "no build record next to the extension"
    if torch_version is not None:
        record["torch_version"] = torch_version
    with open(os.path.join(pkg, "_build_meta.py"), "w", encoding="utf-8") as f:
        f.write(f"BUILD = {record!r}\n")
    return pkg


SCRIPT = textwrap.dedent(
    """
    import os, sys
    import kdfused
    assert kdfused.__file__.startswith(sys.argv[1]), kdfused.__file__

    def extension_mapped():
        with open("/proc/self/maps") as f:
            return os.path.join(sys.argv[1], "_C.") in f.read()

    try:
        info = kdfused.build_info()
    except ImportError as exc:
        assert exc.name == "kdfused._C", exc.name
        assert "kdfused._C" not in sys.modules
        if os.path.exists("/proc/self/maps"):
            assert not extension_mapped(), "the extension was loaded"
        import kdfused.reference  # the pure-PyTorch reference still works
        print("IMPORT-ERROR:", exc)
    else:
        print("LOADED:", info["torch"])
    """
)


def _run(pkg: str, **env) -> str:
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, pkg],
        cwd=os.path.dirname(pkg),
        env={**os.environ, "PYTHONPATH": os.path.dirname(pkg), **env},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_torch_mismatch_raises_import_error(tmp_path):
    out = _run(_copy_package(str(tmp_path), FAKE_TORCH), KDFUSED_SKIP_TORCH_CHECK="")
    assert "IMPORT-ERROR:" in out, out
    assert f"built against torch {FAKE_TORCH}" in out, out
    assert f"this environment has torch {torch.__version__}" in out, out
    assert "pip install --no-build-isolation" in out and "make install" in out, out
    assert "KDFUSED_SKIP_TORCH_CHECK=1" in out, out


def test_torch_check_can_be_skipped(tmp_path):
    out = _run(_copy_package(str(tmp_path), FAKE_TORCH), KDFUSED_SKIP_TORCH_CHECK="1")
    assert f"LOADED: {FAKE_TORCH}" in out, out


def test_matching_record_loads(tmp_path):
    out = _run(_copy_package(str(tmp_path)), KDFUSED_SKIP_TORCH_CHECK="")
    assert f"LOADED: {torch.__version__}" in out, out
