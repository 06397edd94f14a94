#!/usr/bin/env bash
# gpu_check.sh -- the whole GPU check of kdfused in one command, for a machine with a GPU and no
# network:
#
#     bash benchmarks/gpu_check.sh OUTDIR
#
# Steps (each time-boxed; a failed step is logged and the script goes on):
#   0. environment: nvidia-smi, driver, torch, CUDA, nvcc -> OUTDIR/env.txt
#   1. build the extension in place (KDFUSED_CUDA=1, TORCH_CUDA_ARCH_LIST=9.0 unless set)
#   2. pytest -k cuda (wheels/ is installed first with pip --no-index when present)
#   3. sanity: forward+backward of every launch policy (warp, CTA + stage, cluster, two-phase,
#      unstaged) against kdfused.reference, determinism, scale_grads; timing of the headline case
#      (bf16 N=8192 V=128256 T=2 0.5/0.5) against the 6 B/element floor
#   4. compute-sanitizer memcheck + racecheck on a tiny run of each policy (when available)
#   5. benchmark sweep: python benchmarks/run.py --device cuda --out OUTDIR/bench
# Everything goes to OUTDIR (logs per step); a short table is printed last. Budget: < 8 minutes on
# an H200 (GPU_CHECK_BUDGET_S, default 450 s, caps the whole run; per-step time boxes: build 300 s,
# pytest 180, sanity 150, sanitizers 2 x 90, bench 150; typical total 5-7 minutes).
set -uo pipefail

OUT="${1:?usage: bash benchmarks/gpu_check.sh OUTDIR}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python}"
command -v "$PY" >/dev/null 2>&1 || PY=python3
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"
T0=$(date +%s)

note() { printf '%s\n' "$*" | tee -a "$SUMMARY"; }
# The whole script stays inside GPU_CHECK_BUDGET_S (default 450 s, i.e. < 8 minutes): each step's
# time box is cut to what is left, and a step that would get under 15 s is skipped and said so.
BUDGET_S="${GPU_CHECK_BUDGET_S:-450}"
# step NAME TIMEOUT_S CMD...: runs CMD with a time box, log in OUT/NAME.log, one summary line.
step() {
  local name=$1 limit=$2
  shift 2
  local left=$((BUDGET_S - ($(date +%s) - T0)))
  if [ "$left" -lt 15 ]; then
    note "$(printf '%-12s %-16s' "$name" "SKIPPED (budget of ${BUDGET_S}s spent)")"
    return 124
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  local t=$(date +%s)
  echo "== [$name] $* (time box ${limit}s)"
  timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  local dt=$(($(date +%s) - t))
  local what="ok"
  [ $rc -eq 124 ] && what="TIMEOUT"
  [ $rc -ne 0 ] && [ $rc -ne 124 ] && what="FAILED (rc $rc)"
  note "$(printf '%-12s %-16s %4ss  log: %s' "$name" "$what" "$dt" "$OUT/$name.log")"
  tail -n 3 "$OUT/$name.log" | sed 's/^/    /'
  return $rc
}

# ---- 0. environment -----------------------------------------------------------------------
{
  echo "date: $(date -u)"
  echo "host: $(hostname)"
  echo "git: $(git -C "$ROOT" rev-parse HEAD 2>/dev/null) $(git -C "$ROOT" status --porcelain 2>/dev/null | wc -l) changed files"
  echo "--- nvidia-smi"
  nvidia-smi 2>&1 || echo "nvidia-smi: not available"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv 2>&1 || true
  echo "--- nvcc"
  nvcc --version 2>&1 || echo "nvcc: not on PATH"
  echo "--- python / torch"
  "$PY" - <<'EOF' 2>&1
import sys, platform
print("python", sys.version.replace("\n", " "), platform.machine())
try:
    import torch
    print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        print("device", p.name, "sm_%d%d" % (p.major, p.minor), "SMs", p.multi_processor_count,
              "mem %.1f GiB" % (p.total_memory / 2**30))
except Exception as e:  # noqa: BLE001
    print("torch import failed:", e)
for m in ("pytest", "hypothesis", "triton", "ninja", "pybind11", "numpy", "liger_kernel"):
    try:
        mod = __import__(m)
        print(m, getattr(mod, "__version__", "?"))
    except Exception:  # noqa: BLE001
        print(m, "MISSING")
EOF
  echo "--- compute-sanitizer"
  command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null || echo "not found"
} >"$OUT/env.txt" 2>&1
note "env          written           $OUT/env.txt"

HAVE_GPU=$("$PY" -c 'import torch; print(int(torch.cuda.is_available()))' 2>/dev/null || echo 0)
[ "$HAVE_GPU" = 1 ] || note "NOTE: no CUDA device visible to torch: the GPU steps will skip or fail cleanly"

# Offline wheels (pytest, hypothesis, ...), if carried along.
if [ -d "$ROOT/wheels" ]; then
  step wheels 120 "$PY" -m pip install --no-index --find-links "$ROOT/wheels" pytest hypothesis pytest-benchmark || true
fi

# ---- 1. build -----------------------------------------------------------------------------
export KDFUSED_CUDA="${KDFUSED_CUDA:-1}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export MAX_JOBS="${MAX_JOBS:-16}"
BUILD_OK=0
if step build 300 "$PY" setup.py build_ext --inplace; then
  BUILD_OK=1
fi
step import 60 "$PY" -c 'import kdfused, torch; print(kdfused.build_info()); print(torch.ops.kdfused.kd_loss)' || BUILD_OK=0

# ---- 2. tests -----------------------------------------------------------------------------
if "$PY" -c 'import pytest' >/dev/null 2>&1; then
  if [ $BUILD_OK = 1 ]; then
    step pytest 180 "$PY" -m pytest tests -k cuda -x -q -p no:cacheprovider || true
  else
    note "pytest       SKIPPED           (build failed)"
  fi
else
  note "pytest       SKIPPED           (pytest is not importable here; carry wheels/ to run it)"
fi

# ---- 3. sanity + headline timing -------------------------------------------------------------
cat >"$OUT/gpu_sanity.py" <<'EOF'
"""Forward+backward of every CUDA launch policy against kdfused.reference; determinism; timing.

usage: python gpu_sanity.py [--tiny] [--no-time]
"""
import math
import os
import sys
import time

import torch

import kdfused
from kdfused import reference

TINY = "--tiny" in sys.argv
NO_TIME = "--no-time" in sys.argv or TINY
dev = "cuda"
if not torch.cuda.is_available():
    print("SKIP: no CUDA device")
    sys.exit(0)
torch.manual_seed(0)
DT = {"f16": torch.float16, "bf16": torch.bfloat16, "f32": torch.float32, "f64": torch.float64}
TOL = {"f16": 2e-2, "bf16": 6e-2, "f32": 2e-4, "f64": 1e-9}

# (name, N, V, s dtype, t dtype, view, options); view: "c" contiguous, "s" both sliced [:, :-1]
# (misaligned rows, same misalignment), "m" only the student sliced (different misalignment:
# scalar path), "T" 3-d input with a transposed leading pair (row strides via row_sizes)
FULL = [
    ("warp V=100", 64, 100, "f32", "f32", "c", {}),
    ("warp V=1", 5, 1, "f32", "f32", "c", {}),
    ("warp V=7 bf16", 9, 7, "bf16", "bf16", "c", {}),
    ("warp V=1000 view", 33, 1000, "bf16", "bf16", "s", {}),
    ("warp V=2048 f64", 17, 2048, "f64", "f64", "c", {"divergence": "ce"}),
    ("block staged V=8192", 600, 8192, "f16", "f16", "c", {}),
    ("block staged mixed", 300, 6000, "bf16", "f32", "s", {"temperature": 1.0}),
    ("block misaligned", 300, 5001, "f32", "f32", "m", {}),
    ("block 3-d", 40, 4099, "f32", "bf16", "T", {"temperature": 0.5}),
    ("cluster V=128256", 8, 128256, "bf16", "bf16", "c", {}),
    ("cluster V=32000 ce", 64, 32000, "bf16", "bf16", "s", {"divergence": "ce", "reduction": "none"}),
    ("unstaged fp32 V=300000", 3, 300000, "f32", "f32", "c", {"reduction": "sum"}),
    ("f16 x bf16 (converted)", 50, 3000, "f16", "bf16", "c", {}),
    ("bf16 x f64 (converted)", 20, 5000, "bf16", "f64", "c", {}),
    ("loss only", 128, 128256, "bf16", "bf16", "c", {"nograd": True}),
]
TINYSET = [
    ("warp", 6, 100, "f32", "f32", "s", {}),
    ("block staged", 300, 5000, "bf16", "bf16", "c", {}),
    ("cluster/two-phase", 2, 40000, "bf16", "bf16", "s", {}),
    ("misaligned", 3, 4100, "f32", "f32", "m", {"reduction": "none"}),
]


def make(N, V, sd, td, view):
    if view == "T":
        s = torch.randn(2, N, V + 3, device=dev).transpose(0, 1)[..., :V]
        t = torch.randn(2, N, V + 3, device=dev).transpose(0, 1)[..., :V]
        y = torch.randint(0, V, (N, 2), device=dev)
    else:
        extra_s = 1 if view in ("s", "m") else 0
        extra_t = 1 if view == "s" else 0
        s = (3 * torch.randn(N, V + extra_s, device=dev))[:, :V]
        t = (3 * torch.randn(N, V + extra_t, device=dev))[:, :V]
        y = torch.randint(0, V, (N,), device=dev)
    s = s.to(DT[sd])
    t = t.to(DT[td])
    y.view(-1)[::7] = -100  # some ignored rows
    if V >= 3:  # a masked vocabulary slice in the first row (both -inf: p = q = 0 there)
        first = (0,) * (s.dim() - 1)
        s[first][: V // 3] = float("-inf")
        t[first][: V // 3] = float("-inf")
    return s, t, y


def rel(a, b):
    a, b = a.double(), b.double()
    fin = torch.isfinite(b)
    if not torch.equal(torch.isnan(a), torch.isnan(b)):
        return float("inf")
    d = (a[fin] - b[fin]).abs().max().item() if fin.any() else 0.0
    return d / max(b[fin].abs().max().item() if fin.any() else 1.0, 1e-30)


fails = 0
rows = []
for name, N, V, sd, td, view, opt in (TINYSET if TINY else FULL):
    opt = dict(opt)
    nograd = opt.pop("nograd", False)
    kw = dict(temperature=2.0, soft_weight=0.5, hard_weight=0.5, divergence="kl", reduction="batchmean")
    kw.update(opt)
    for env in ([None] if TINY else [None, "1"]):  # "1": sm_80 policy (two-phase) on sm_90
        if env:
            os.environ["KDFUSED_CUDA_NO_CLUSTERS"] = "1"
        else:
            os.environ.pop("KDFUSED_CUDA_NO_CLUSTERS", None)
        s, t, y = make(N, V, sd, td, view)
        s0, t0 = s.clone(), t.clone()
        out = []
        go = None
        for rep in range(2):
            ss = s.detach().requires_grad_(not nograd)
            tt = t.detach().requires_grad_(not nograd)
            loss = kdfused.kd_loss(ss, tt, y, **kw)
            if not nograd:
                if go is None:  # the same grad_output for both runs and the reference
                    go = (torch.rand_like(loss) + 0.5 if loss.dim()
                          else torch.tensor(2.0, device=dev, dtype=loss.dtype))
                loss.backward(go)
                out.append((loss.detach(), ss.grad, tt.grad))
            else:
                out.append((loss.detach(), None, None))
        torch.cuda.synchronize()
        det = all(
            (a is None and b is None) or torch.equal(torch.nan_to_num(a), torch.nan_to_num(b))
            for a, b in zip(out[0], out[1]))
        unchanged = torch.equal(s, s0) and torch.equal(t, t0)
        sr = s.detach().double().requires_grad_(not nograd)
        tr = t.detach().double().requires_grad_(not nograd)
        ref = reference.kd_loss(sr, tr, y, **kw)
        if not nograd:
            ref.backward(go.double())
        e_loss = rel(out[0][0], ref.detach())
        e_gs = rel(out[0][1], sr.grad) if not nograd else 0.0
        e_gt = rel(out[0][2], tr.grad) if not nograd else 0.0
        tol = max(TOL[sd], TOL[td])
        ok = det and unchanged and e_loss <= tol and e_gs <= tol and e_gt <= tol
        fails += not ok
        tag = name + (" [no clusters]" if env else "")
        rows.append(f"{'ok  ' if ok else 'FAIL'} {tag:38s} loss {e_loss:.1e} gs {e_gs:.1e} gt {e_gt:.1e}"
                    f" det {det} inputs-unchanged {unchanged}")
        print(rows[-1], flush=True)
os.environ.pop("KDFUSED_CUDA_NO_CLUSTERS", None)

if not NO_TIME:
    # Headline: bf16 N=8192 V=128256, T=2, soft 0.5 hard 0.5, fwd+bwd (grad_student only).
    N, V = 8192, 128256
    s = torch.randn(N, V, device=dev, dtype=torch.bfloat16)
    t = torch.randn(N, V, device=dev, dtype=torch.bfloat16)
    y = torch.randint(0, V, (N,), device=dev)
    op = torch.ops.kdfused.kd_loss

    def run():
        return op(s, t, y, 2.0, 0.5, 0.5, "kl", -100, "batchmean", True, False)

    for _ in range(3):
        run()
    torch.cuda.synchronize()
    reps = 20
    ev = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
    ev[0].record()
    for _ in range(reps):
        run()
    ev[1].record()
    torch.cuda.synchronize()
    ms = ev[0].elapsed_time(ev[1]) / reps
    # copy bandwidth (read + write) of a 3 GB buffer
    x = torch.empty(1536 * 2**20, dtype=torch.bfloat16, device=dev)
    z = torch.empty_like(x)
    z.copy_(x)
    torch.cuda.synchronize()
    ev[0].record()
    for _ in range(5):
        z.copy_(x)
    ev[1].record()
    torch.cuda.synchronize()
    copy_gbps = 2 * x.numel() * 2 * 5 / (ev[0].elapsed_time(ev[1]) / 1e3) / 1e9
    bytes_moved = 6 * N * V
    floor_ms = bytes_moved / (copy_gbps * 1e9) * 1e3
    line = (f"headline bf16 8192x128256 fwd+bwd: {ms:.3f} ms, {bytes_moved / ms / 1e6:.0f} GB/s; "
            f"copy {copy_gbps:.0f} GB/s -> floor {floor_ms:.3f} ms, ratio {ms / floor_ms:.2f} (target <= 1.25)")
    print(line)
    rows.append(line)
    with torch.no_grad():
        run_l = lambda: op(s, t, y, 2.0, 0.5, 0.5, "kl", -100, "batchmean", False, False)  # noqa: E731
        run_l()
        torch.cuda.synchronize()
        ev[0].record()
        for _ in range(reps):
            run_l()
        ev[1].record()
        torch.cuda.synchronize()
        ms_l = ev[0].elapsed_time(ev[1]) / reps
    line = f"headline loss only: {ms_l:.3f} ms, floor {4 * N * V / (copy_gbps * 1e9) * 1e3:.3f} ms"
    print(line)
    rows.append(line)

print("SANITY", "PASS" if fails == 0 else f"FAIL ({fails})")
sys.exit(1 if fails else 0)
EOF

if [ $BUILD_OK = 1 ]; then
  step sanity 150 "$PY" "$OUT/gpu_sanity.py" || true
else
  note "sanity       SKIPPED           (build failed)"
fi

# ---- 4. compute-sanitizer ---------------------------------------------------------------------
CS=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1 || true)
if [ -n "$CS" ] && [ $BUILD_OK = 1 ] && [ "$HAVE_GPU" = 1 ]; then
  step memcheck 90 "$CS" --tool memcheck --error-exitcode 9 "$PY" "$OUT/gpu_sanity.py" --tiny || true
  step racecheck 90 "$CS" --tool racecheck --error-exitcode 9 "$PY" "$OUT/gpu_sanity.py" --tiny || true
else
  note "sanitizer    SKIPPED           (compute-sanitizer: ${CS:-not found}; build ok: $BUILD_OK; gpu: $HAVE_GPU)"
fi

# ---- 5. benchmark sweep -------------------------------------------------------------------
if [ $BUILD_OK = 1 ] && [ "$HAVE_GPU" = 1 ]; then
  step bench 150 "$PY" benchmarks/run.py --device cuda --out "$OUT/bench" --providers kdfused,eager \
    --target-s 0.2 --timeout 60 --no-plot || true
else
  note "bench        SKIPPED           (build ok: $BUILD_OK; gpu: $HAVE_GPU)"
fi

# ---- summary ------------------------------------------------------------------------------
echo
echo "================ kdfused GPU check: $(($(date +%s) - T0)) s, logs in $OUT ================"
cat "$SUMMARY"
if [ -f "$OUT/sanity.log" ]; then
  echo "--- sanity"
  grep -E "^(ok|FAIL)|headline|SANITY|SKIP" "$OUT/sanity.log" || tail -n 20 "$OUT/sanity.log"
fi
if [ -f "$OUT/pytest.log" ]; then
  echo "--- pytest"
  tail -n 3 "$OUT/pytest.log"
fi
if [ -f "$OUT/bench.log" ]; then
  echo "--- benchmark (last lines)"
  tail -n 25 "$OUT/bench.log"
fi
exit 0
