#!/usr/bin/env bash
# The package as users install it, after `make install` (run by `make test`):
#   1. the sdist and the wheel, built from this checkout without build isolation (the README's
#      commands); the wheel's compile step reuses the in-place build's ninja objects (build/),
#      so nothing is recompiled: only the link runs again;
#   2. their contents and metadata (the sdist holds the sources and no build output; the wheel's
#      version carries its local label, and it holds the extension and its build record);
#   3. a fresh virtual environment holding only torch (and what torch requires, hard-linked from
#      .venv rather than downloaded again) gets the wheel with pip, offline (--no-index: the wheel
#      needs nothing else);
#   4. from a directory outside the checkout (so that the in-place build cannot be imported):
#      the self-test, then, with pytest linked in too, a few test files (the torch-mismatch check
#      on a copy of the installed package, the op checks, the module API).
# Usage: make wheel-check, or bash .ci/wheel_check.sh where `make install` has run (VENV: the
# build's virtual environment, default .venv).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=$(cd "${VENV:-.venv}" && pwd)/bin/python
WORK=$ROOT/build/wheel-check
start=$SECONDS
step() { echo "== wheel check, $((SECONDS - start)) s: $*"; }

rm -rf "$WORK" dist
mkdir -p "$WORK"

step "sdist and wheel (python -m build --sdist --wheel --no-isolation)"
"$PY" -m build --sdist --wheel --no-isolation --outdir dist . >"$WORK/build.log" 2>&1 ||
  { tail -50 "$WORK/build.log"; exit 1; }
if grep -E '^\[[0-9]+/[0-9]+\] .* -c ' "$WORK/build.log"; then
  echo "the wheel build recompiled sources (expected: the in-place build's objects reused)"
  exit 1
fi
SDIST=$(ls dist/kdfused-*.tar.gz)
WHEEL=$(ls dist/kdfused-*.whl)
echo "$SDIST"
echo "$WHEEL"

step "contents and metadata"
"$PY" - "$SDIST" "$WHEEL" <<'EOF'
import re, sys, tarfile, zipfile
import torch
sys.path.insert(0, ".")
from kdfused._version import __version__ as version

sdist, wheel = sys.argv[1], sys.argv[2]
names = {n.split("/", 1)[1] for n in tarfile.open(sdist).getnames() if "/" in n}
for need in ["setup.py", "pyproject.toml", "MANIFEST.in", "README.md", "LICENSE", "CHANGELOG.md",
             "CMakeLists.txt", "cmake/KdfusedCuda.cmake", "csrc/kd_python.cpp", "csrc/kd_math.h",
             "csrc/cpu/kd_kernel_cpu.h", "csrc/cuda/kd_loss_cuda.cu", "kdfused/_version.py",
             "kdfused/py.typed"]:
    assert need in names, f"sdist lacks {need}"
leaked = [n for n in names if n.endswith((".so", ".o")) or n.endswith("_build_meta.py")]
assert not leaked, f"build output in the sdist: {leaked}"
assert f"kdfused-{version}.tar.gz" in sdist, sdist

public = str(torch.__version__).split("+")[0]
m = re.search(r"kdfused-([^-]+)-cp\d+-cp\d+-linux_x86_64\.whl$", wheel)
assert m, wheel
label = m.group(1)
expect = rf"{re.escape(version)}\+torch{re.escape(public)}\.(cpu|cu\d+)"
assert re.fullmatch(expect, label), (label, expect)
zf = zipfile.ZipFile(wheel)
files = zf.namelist()
assert any(re.fullmatch(r"kdfused/_C\..*\.so", f) for f in files), files
assert "kdfused/_build_meta.py" in files, files
assert "kdfused/py.typed" in files, files  # (PEP 561: type checkers read the package's annotations)
meta = zf.read(f"kdfused-{label}.dist-info/METADATA").decode()
for line in ["Summary: ", "License-Expression: MIT", "Requires-Python: >=3.9",
             f"Requires-Dist: torch=={public}", "Description-Content-Type: text/markdown",
             "Classifier: Typing :: Typed"]:
    assert line in meta, f"wheel METADATA lacks {line!r}"
assert "# kdfused" in meta, "no README in the metadata"
assert any(f.endswith("licenses/LICENSE") for f in files), "no LICENSE in the wheel"
print(f"sdist: {len(names)} files; wheel {label}: {len(files)} files; metadata complete")
EOF

step "fresh virtual environment: torch, then the wheel with pip (offline)"
BASE_PY=$("$PY" -c 'import sys; print(sys._base_executable)')
"$BASE_PY" -m venv --without-pip "$WORK/venv"
VPY=$WORK/venv/bin/python
SITE=$("$VPY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
"$PY" .ci/link_dists.py "$SITE" torch | cut -c1-200
"$PY" -m pip --python "$VPY" install --no-index --no-cache-dir "$WHEEL"

step "self-test from outside the checkout"
OUTSIDE=$(mktemp -d)
trap 'rm -rf "$OUTSIDE"' EXIT
cd "$OUTSIDE"
env -u PYTHONPATH "$VPY" - "$SITE" <<'EOF'
import sys
import kdfused
assert kdfused.__file__.startswith(sys.argv[1]), f"kdfused from {kdfused.__file__}, not the wheel"
print("kdfused", kdfused.build_info())
EOF
env -u PYTHONPATH "$VPY" -m kdfused.selftest --device cpu --quick

step "tests from outside the checkout"
"$PY" "$ROOT/.ci/link_dists.py" "$SITE" pytest | cut -c1-200
cp "$ROOT"/tests/{conftest.py,oracle.py,params.py,test_install.py,test_ops.py,test_module.py} .
env -u PYTHONPATH "$VPY" -m pytest -q -p no:cacheprovider test_install.py test_ops.py \
  test_module.py -k "not compile"
step "passed"
