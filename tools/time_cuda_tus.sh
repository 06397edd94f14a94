#!/usr/bin/env bash
# Compiles CUDA translation units one at a time with the exact nvcc command that ninja uses (taken
# from setup.py's build/temp*/build.ninja; run a CUDA build once first, e.g. with
# TORCH_CUDA_ARCH_LIST=9.0) and prints the CPU seconds (user+sys) of each, and their total.
#   tools/time_cuda_tus.sh [FILE.cu ...]     (default: every .cu under csrc/cuda)
set -euo pipefail
cd "$(dirname "$0")/.."
ninja_file=$(ls build/temp*/build.ninja 2>/dev/null | head -n1)
[ -n "$ninja_file" ] || { echo "no build/temp*/build.ninja: run a CUDA build first" >&2; exit 1; }
var() { sed -n "s/^$1 = //p" "$ninja_file" | head -n1; }
nvcc=$(var nvcc)
cflags=$(var cuda_cflags)
post=$(var cuda_post_cflags)
if [ $# -eq 0 ]; then
  mapfile -t files < <(find csrc/cuda -name '*.cu' | sort)
else
  files=("$@")
fi
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
total=0
for f in "${files[@]}"; do
  if ! eval "/usr/bin/time -f %U+%S $nvcc $cflags -c $f -o $out/tu.o $post" >/dev/null 2>"$out/err"; then
    cat "$out/err" >&2
    exit 1
  fi
  s=$(tail -n1 "$out/err" | bc)
  total=$(echo "$total + $s" | bc)
  printf '%-62s %7.1f s\n' "$f" "$s"
done
printf '%-62s %7.1f s\n' total "$total"
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
