#!/usr/bin/env bash
# gpu_check.sh -- does every CUDA path of kdfused compute the right thing, and how fast is it?
# One command for a machine with a GPU (no network needed):
#
#     bash benchmarks/gpu_check.sh OUTDIR
#
# Exit status:
#   0  every step passed
#   1  a step failed, timed out or was cut by the budget (summary.md says which)
#   2  usage error
#   3  no GPU present: the pre-flight checks passed (the scripts exist, the package builds and
#      imports on the CPU, the CUDA tests collect, the tools are reported); nothing ran on a GPU
#
# Steps, each in its own time box and each run whatever happened before it:
#   env        nvidia-smi, torch, nvcc, compute-sanitizer, packages
#   build      python setup.py build_ext --inplace with KDFUSED_CUDA=1, TORCH_CUDA_ARCH_LIST set
#              to this GPU's architecture only, MAX_JOBS=16; every later step imports this build
#              (PYTHONPATH=<repo>, checked)
#   import     the fresh build imports and has CUDA kernels
#   selftest   python -m kdfused.selftest --device all: every CPU instruction set and every CUDA
#              launch policy against float64 expected values
#   pytest     the CUDA tests (-k cuda); those that trip a device-side assert run one per process
#   sanitizer  compute-sanitizer memcheck, racecheck, synccheck on the quick CUDA self-test
#              ("tool unavailable on this machine" is told apart from "errors found")
#   bench      benchmarks/run.py: kdfused vs eager vs torch.compile (and Liger when importable)
# Without a GPU: env, files, a CPU build + import, the quick CPU self-test, the collection of
# the CUDA tests, the tool report and a tiny CPU benchmark; then exit 3.
#
# OUTDIR gets at most 8 files, each under 16 MiB: summary.md (the verdict, also printed last),
# selftest.txt, pytest.txt, sanitizer.txt, bench.csv, bench.json, bench.png, logs.tar.gz (every
# step's full log).
#
# Environment: PYTHON (default: .venv/bin/python of the repo if present, else python3),
# GPU_CHECK_BUDGET_S (whole run, default 450 s; every step's time box is cut to fit, and the
# later steps keep a minimum), GPU_CHECK_SELFTEST_ARGS (extra self-test arguments, e.g.
# "--divergences kl,ce"), TORCH_CUDA_ARCH_LIST, MAX_JOBS (default 16; 2 without a GPU),
# KDFUSED_CUDA (default 1; 0 without a GPU).
set -uo pipefail

if [ $# -ne 1 ] || [ "${1:0:1}" = "-" ]; then
  echo "usage: bash benchmarks/gpu_check.sh OUTDIR" >&2
  exit 2
fi
OUT="$1"
mkdir -p "$OUT" || exit 2
OUT="$(cd "$OUT" && pwd)"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 2
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x "$ROOT/.venv/bin/python" ]; then PY="$ROOT/.venv/bin/python"
  elif command -v python3 >/dev/null 2>&1; then PY=python3
  else PY=python; fi
fi
BUDGET_S="${GPU_CHECK_BUDGET_S:-450}"
SELFTEST_ARGS="${GPU_CHECK_SELFTEST_ARGS:-}"
export PY ROOT BUDGET_S
T0=$(date +%s)
WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")" || exit 2
trap 'rm -rf "$WORK"' EXIT
FILES=(summary.md selftest.txt pytest.txt sanitizer.txt bench.csv bench.json bench.png logs.tar.gz)
for f in "${FILES[@]}"; do rm -f "$OUT/$f"; done  # no stale results from an earlier run
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

record() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "${3:-0}" "${4:-}" >>"$WORK/steps.tsv"; }

# step NAME BOX RESERVE CMD...: runs CMD with its output in WORK/NAME.log, in a time box of BOX
# seconds cut to what the budget leaves after RESERVE seconds kept for the later steps.
step() {
  local name=$1 box=$2 reserve=$3
  shift 3
  local left=$((BUDGET_S - ($(date +%s) - T0) - reserve))
  if [ "$left" -lt 10 ]; then
    record "$name" "skip:the budget of ${BUDGET_S} s was spent (GPU_CHECK_BUDGET_S)"
    echo "== [$name] not run: budget spent"
    return 1
  fi
  [ "$box" -gt "$left" ] && box=$left
  echo "== [$name] (time box ${box} s) $*"
  if declare -F "$1" >/dev/null; then  # a function of this script: run it in a child bash
    export -f "$1"
    set -- bash -c "$1"
  fi
  local t
  t=$(date +%s)
  timeout --kill-after=10 "$box" "$@" >"$WORK/$name.log" 2>&1
  local rc=$?
  record "$name" "$rc" $(($(date +%s) - t)) "$box"
  tail -n 2 "$WORK/$name.log" | cut -c1-200 | sed 's/^/    /'
  return $rc
}
skip() { record "$1" "skip:$2"; echo "== [$1] not run: $2"; }

# copy_capped SRC DST: DST is SRC, or its first and last 7 MiB when it is larger than 15 MiB.
copy_capped() {
  [ -f "$1" ] || return 1
  if [ "$(stat -c %s "$1")" -gt $((15 << 20)) ]; then
    { head -c $((7 << 20)) "$1"; printf '\n[... cut: the file was larger than 15 MiB ...]\n'
      tail -c $((7 << 20)) "$1"; } >"$2"
  else
    cp "$1" "$2"
  fi
}

# ---- env ---------------------------------------------------------------------------------------
env_info() {
  echo "date: $(date -u)"
  echo "host: $(hostname)"
  echo "git: $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null)" \
    "($(git -C "$ROOT" status --porcelain 2>/dev/null | wc -l) changed files)"
  echo "budget: ${BUDGET_S} s; python: $PY"
  "$PY" benchmarks/gpu_steps.py env
  echo "--- nvidia-smi"
  nvidia-smi 2>&1 || echo "nvidia-smi: not available"
  echo "--- nvcc"
  nvcc --version 2>&1 || echo "nvcc: not on PATH"
}
step env 60 0 env_info
GPU=$("$PY" -c 'import torch; print(int(torch.cuda.is_available()))' 2>/dev/null || echo 0)
[ "$GPU" = 1 ] && MODE=gpu || MODE=nogpu
export MODE
if [ "$MODE" = nogpu ]; then
  echo "no GPU present: pre-flight checks only (exit 3 if they pass)"
fi

# ---- the check's own files ---------------------------------------------------------------------
check_files() {
  local ok=0
  for f in benchmarks/gpu_check.sh benchmarks/gpu_steps.py benchmarks/gpu_summary.py \
    benchmarks/run.py benchmarks/_worker.py benchmarks/_providers.py benchmarks/plot.py \
    kdfused/selftest.py kdfused/_selftest_cases.py setup.py tests/test_inputs.py; do
    if [ -f "$f" ]; then echo "present: $f"; else echo "MISSING: $f"; ok=1; fi
  done
  bash -n benchmarks/gpu_check.sh || ok=1
  "$PY" - <<'EOF' || ok=1
import sys
bad = 0
for f in ["benchmarks/gpu_steps.py", "benchmarks/gpu_summary.py", "benchmarks/run.py",
          "benchmarks/_worker.py", "benchmarks/_providers.py", "benchmarks/plot.py",
          "kdfused/selftest.py", "kdfused/_selftest_cases.py"]:
    try:
        compile(open(f).read(), f, "exec")
    except Exception as exc:
        print("does not compile:", f, exc); bad = 1
print("python sources compile" if not bad else "python sources: errors above")
sys.exit(bad)
EOF
  return $ok
}
step files 30 0 check_files

if [ -d "$ROOT/wheels" ]; then  # offline wheels (pytest, hypothesis, ...), if carried along
  step wheels 90 240 "$PY" -m pip install --no-index --find-links "$ROOT/wheels" pytest \
    hypothesis pytest-benchmark
fi

# ---- build -------------------------------------------------------------------------------------
if [ "$MODE" = gpu ]; then
  export MAX_JOBS="${MAX_JOBS:-16}"
  export KDFUSED_CUDA="${KDFUSED_CUDA:-1}"
  ARCH="${TORCH_CUDA_ARCH_LIST:-$("$PY" benchmarks/gpu_steps.py arch 2>/dev/null)}"
  export TORCH_CUDA_ARCH_LIST="${ARCH:-9.0}"
else
  export MAX_JOBS="${MAX_JOBS:-2}"
  export KDFUSED_CUDA="${KDFUSED_CUDA:-0}"  # the CPU build is what can be checked here
fi
build() {
  echo "KDFUSED_CUDA=$KDFUSED_CUDA TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-}" \
    "MAX_JOBS=$MAX_JOBS"
  rm -f kdfused/_C*.so  # a failed build must not leave an older library to import
  "$PY" setup.py build_ext --inplace
}
# Seconds kept for each later step: the budget cuts the earlier steps' time boxes first.
if [ "$MODE" = gpu ]; then MIN_SELFTEST=60 MIN_PYTEST=45 MIN_SAN=45 MIN_BENCH=75
else MIN_SELFTEST=20 MIN_PYTEST=20 MIN_SAN=5 MIN_BENCH=30; fi
AFTER_SELFTEST=$((MIN_PYTEST + MIN_SAN + MIN_BENCH))
RESERVE=$((MIN_SELFTEST + AFTER_SELFTEST + 15))
BUILD_OK=0
step build 300 "$RESERVE" build && BUILD_OK=1
check_import() {
  "$PY" - "$ROOT" "$MODE" <<'EOF'
import os, sys
import torch
import kdfused
root, mode = sys.argv[1], sys.argv[2]
lib = kdfused._C.__file__
where = os.path.dirname(os.path.realpath(lib))
if where != os.path.join(os.path.realpath(root), "kdfused"):
    sys.exit(f"kdfused was imported from {lib}, not from the fresh build in {root}")
info = kdfused.build_info()
if mode == "gpu" and not info["cuda"]:
    sys.exit(f"the fresh build has no CUDA kernels: {info}")
print("ops:", torch.ops.kdfused.kd_loss)
print("imported", lib, info)
EOF
}
if [ $BUILD_OK = 1 ]; then step import 60 "$RESERVE" check_import || BUILD_OK=0
else skip import "the build failed"; fi

# ---- self-test ---------------------------------------------------------------------------------
if [ $BUILD_OK = 1 ]; then
  if [ "$MODE" = gpu ]; then
    step selftest 120 "$AFTER_SELFTEST" "$PY" -m kdfused.selftest --device all $SELFTEST_ARGS
  else
    step selftest 60 "$AFTER_SELFTEST" "$PY" -m kdfused.selftest --device cpu --quick $SELFTEST_ARGS
  fi
  copy_capped "$WORK/selftest.log" "$OUT/selftest.txt"
else
  skip selftest "the build failed"
  echo "not run: the build failed (see logs.tar.gz: build.log)" >"$OUT/selftest.txt"
fi

# ---- CUDA tests --------------------------------------------------------------------------------
# box_for MAX RESERVE: MAX seconds, or less if the budget must keep RESERVE for later steps.
box_for() {
  local b=$((BUDGET_S - ($(date +%s) - T0) - $2))
  [ "$b" -gt "$1" ] && b=$1
  echo "$b"
}
inner() { [ "$1" -gt 20 ] && echo $(($1 - 15)) || echo 5; }  # a step's own deadline, inside its box
if [ "$MODE" = gpu ] && [ $BUILD_OK = 1 ]; then
  B=$(box_for 120 $((MIN_SAN + MIN_BENCH)))
  step pytest "$B" $((MIN_SAN + MIN_BENCH)) "$PY" benchmarks/gpu_steps.py pytest \
    "$WORK/pytest.txt" --budget "$(inner "$B")"
elif [ "$MODE" = nogpu ]; then
  step pytest 60 $((MIN_SAN + MIN_BENCH)) "$PY" benchmarks/gpu_steps.py pytest \
    "$WORK/pytest.txt" --list
else
  skip pytest "the build failed"
fi
copy_capped "$WORK/pytest.txt" "$OUT/pytest.txt" ||
  echo "not run (see summary.md)" >"$OUT/pytest.txt"

# ---- compute-sanitizer -------------------------------------------------------------------------
if [ $BUILD_OK = 1 ] || [ "$MODE" = nogpu ]; then
  B=$(box_for 90 "$MIN_BENCH")
  step sanitizer "$B" "$MIN_BENCH" "$PY" benchmarks/gpu_steps.py sanitizer "$WORK/sanitizer.txt" \
    --budget "$(inner "$B")" --selftest-args "$SELFTEST_ARGS"
else
  skip sanitizer "the build failed"
fi
copy_capped "$WORK/sanitizer.txt" "$OUT/sanitizer.txt" ||
  echo "not run (see summary.md)" >"$OUT/sanitizer.txt"

# ---- benchmark ---------------------------------------------------------------------------------
if [ "$MODE" = gpu ] && [ $BUILD_OK = 1 ]; then
  B=$(box_for 600 0)
  step bench "$B" 0 "$PY" benchmarks/gpu_steps.py bench "$WORK/bench" --budget "$(inner "$B")"
  for f in bench.csv bench.json bench.png; do copy_capped "$WORK/bench/$f" "$OUT/$f"; done
elif [ "$MODE" = nogpu ] && [ $BUILD_OK = 1 ]; then
  step bench 90 0 "$PY" benchmarks/gpu_steps.py bench "$WORK/bench" --cpu-smoke
else
  skip bench "the build failed"
fi

# ---- summary and logs --------------------------------------------------------------------------
echo
"$PY" benchmarks/gpu_summary.py "$WORK" "$OUT" "$MODE" >"$WORK/summary.stdout" 2>&1
CODE=$?
if [ ! -s "$OUT/summary.md" ] || { [ $CODE -ne 0 ] && [ $CODE -ne 1 ] && [ $CODE -ne 3 ]; }; then
  # the summary program itself failed: a plain table, and a failing exit status
  { echo "# kdfused GPU check: FAIL (the summary program failed, exit $CODE)"; echo
    echo '```'; cat "$WORK/steps.tsv"; echo; cat "$WORK/summary.stdout"; echo '```'
  } >"$OUT/summary.md"
  CODE=1
fi
for f in "$WORK"/*; do  # keep every log under the size limit before packing
  if [ -f "$f" ] && [ "$(stat -c %s "$f")" -gt $((15 << 20)) ]; then
    copy_capped "$f" "$f.cut" && mv "$f.cut" "$f"
  fi
done
tar -czf "$OUT/logs.tar.gz" -C "$WORK" . 2>/dev/null || echo "could not write logs.tar.gz"
if [ "$(stat -c %s "$OUT/logs.tar.gz" 2>/dev/null || echo 0)" -gt $((16 << 20)) ]; then
  tar -czf "$OUT/logs.tar.gz" -C "$WORK" --exclude='build.log' --exclude='bench' .
fi
echo "================ kdfused GPU check: $(($(date +%s) - T0)) s, results in $OUT"
cat "$OUT/summary.md"
exit $CODE
