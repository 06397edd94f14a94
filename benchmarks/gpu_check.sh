#!/usr/bin/env bash
# gpu_check.sh -- does every CUDA path of kdfused compute the right thing, and how fast is it?
# One command for a machine with a GPU (no network needed), from a fresh checkout:
#
#     bash benchmarks/gpu_check.sh OUTDIR
#
# Steps, each in a time box cut from one budget (GPU_CHECK_BUDGET_S, default 510 s: the verdict
# is written within 9 minutes), each printing its box and the time it used:
#   env        machine, GPU, torch, nvcc, compute-sanitizer, packages
#   files      the check's own scripts exist and compile
#   build      setup.py build_ext --inplace for this GPU's architecture only (MAX_JOBS = cores)
#   import     the fresh build imports and has CUDA kernels
#   selftest   python -m kdfused.selftest --device cuda: every launch plan, the fused linear op and
#              the top-k op (its warp and CTA kernels) against float64
#   pytest     the curated CUDA tests, most informative first (pytest-xdist when present);
#              every failing test named, what did not run counted
#   sanitizer  compute-sanitizer memcheck (warp, block, cluster:2, two_phase:2, linear, topk) +
#              synccheck (warp, block, cluster:2, two_phase:2), kl and jsd, and racecheck (block,
#              cluster:2); a run cut with no error reported is "inconclusive", a tool that cannot
#              run here "n/a": neither passes nor fails
#   nccl       kd_loss and linear_kd_loss with process_group= a world-size-1 nccl group
#   streams    a non-default stream; CUDA graph capture and replay of a training step
#   bench      kdfused vs eager, torch.compile (where its compile fits the budget) and Liger;
#              then, on what is left (run.py keeps at least 60% of the box), linear_bench.py:
#              the fused linear + loss (kdfused-linear, kdfused-trl, kdfused) against TRL's and
#              Liger's chunked losses (where importable) on TRL's soft JSD, N,H,V 4096,1024,32000;
#              each provider in a process of its own with a timeout; skipped when too little is left
#
# Without a GPU, or with GPU_CHECK_REHEARSAL=1, the same steps rehearse: each collects the work
# it would do (test ids, self-test paths, sanitizer cases, benchmark cases) and prints counts and
# budgets, the build step runs against the local build (the benchmarks run a tiny CPU case), nothing
# runs on a GPU. CI runs it.
#
# OUTDIR gets 10 files, each under 16 MiB: summary.md (the verdict, rewritten after every step and
# printed last), selftest.txt, pytest.txt, sanitizer.txt, runtime.txt, bench.csv, bench.json,
# linear.csv, linear.json (the fused linear benchmark), logs.tar.gz (every step's report and full
# log).
#
# Exit status: 0 every step passed (in a rehearsal: the harness is sound); 1 a step failed, timed
# out or was not run; 2 usage; 3 no GPU present and no rehearsal asked for: the rehearsal passed.
#
# Environment: PYTHON (default: the repository's .venv/bin/python if present, else python3),
# GPU_CHECK_BUDGET_S, GPU_CHECK_REHEARSAL, GPU_CHECK_SELFTEST_ARGS (extra self-test arguments,
# e.g. "--divergences kl,ce"), MAX_JOBS.
set -uo pipefail

if [ $# -ne 1 ] || [ "${1:0:1}" = "-" ]; then
  echo "usage: bash benchmarks/gpu_check.sh OUTDIR" >&2
  exit 2
fi
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x "$ROOT/.venv/bin/python" ]; then PY="$ROOT/.venv/bin/python"
  elif command -v python3 >/dev/null 2>&1; then PY=python3
  else PY=python; fi
fi
exec "$PY" "$ROOT/benchmarks/gpu_check.py" "$1"
