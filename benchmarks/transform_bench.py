"""The cost of the logit transform and of the entropy: kd_loss forward + backward (the fused call
that computes the loss and the student gradient) plain, with a scale on both sides, with a softcap
on both sides (Gemma 2's 30), with return_entropy, and with both, in one process, the variants
interleaved round by round so that they see the same machine; medians, with the spread (min-max)
over the rounds. Also kdfused.reference (eager PyTorch) with the same softcap, for scale.

    python benchmarks/transform_bench.py                       # 2048x32000 fp32, 512x128256 bf16
    python benchmarks/transform_bench.py --sizes 2048x32000:float32 --rounds 9 --out F.json

The plain call must cost what it cost before the transform existed (a transform off is a branch per
chunk, not per element): run ``--variants plain`` with this file and an older build of kdfused on
PYTHONPATH in turn (e.g. ``--threads 1 --sizes 512x32000:float32 --rounds 40 --no-reference``).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import time

import torch

import kdfused

VARIANTS = {
    "plain": {},
    "scale both": dict(student_logit_scale=0.25, teacher_logit_scale=0.25),
    "softcap both": dict(student_softcap=30.0, teacher_softcap=30.0),
    "entropy": dict(return_entropy=True),
    "softcap both + entropy": dict(student_softcap=30.0, teacher_softcap=30.0, return_entropy=True),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _commit() -> str:
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        )
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True)  # fmt: skip
        return rev.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except OSError:
        return "unknown"


def time_size(N: int, V: int, dtype: torch.dtype, rounds: int, reference: bool, names) -> dict:
    g = torch.Generator().manual_seed(0)
    # Logits of an LM's spread (a few units, some far out), so the softcap's tanh is exercised.
    s = (torch.randn(N, V, generator=g) * 3).to(dtype).requires_grad_()
    t = (torch.randn(N, V, generator=g) * 3).to(dtype)
    y = torch.randint(0, V, (N,), generator=g)
    opts = dict(temperature=2.0, hard_weight=0.5, divergence="kl")

    def step(fn, kw) -> None:
        out = fn(s, t, y, **opts, **kw)
        loss = out[0] if isinstance(out, tuple) else out
        loss.backward()
        s.grad = None

    variants = {name: (kdfused.kd_loss, VARIANTS[name]) for name in names}
    if reference:
        variants["reference, softcap both"] = (kdfused.reference.kd_loss, VARIANTS["softcap both"])
    for fn, kw in variants.values():  # warm-up (page faults, caches)
        step(fn, kw)
    times = {name: [] for name in variants}
    for r in range(rounds):
        order = list(variants) if r % 2 == 0 else list(reversed(variants))
        for name in order:
            fn, kw = variants[name]
            t0 = time.perf_counter()
            step(fn, kw)
            times[name].append(time.perf_counter() - t0)
    out = {}
    base = statistics.median(times["plain"]) if "plain" in times else float("nan")
    for name, ts in times.items():
        med = statistics.median(ts)
        out[name] = dict(median_ms=1e3 * med, min_ms=1e3 * min(ts), max_ms=1e3 * max(ts),
                         vs_plain=med / base)  # fmt: skip
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="2048x32000:float32,512x128256:bfloat16",
                    help="NxV:dtype, comma-separated")  # fmt: skip
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--no-reference", action="store_true")
    ap.add_argument("--variants", default=",".join(VARIANTS),
                    help="comma list of: " + ", ".join(VARIANTS))  # fmt: skip
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    ap.add_argument("--out", help="write the results as JSON here")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    info = kdfused.build_info()
    unknown = set(a.variants.split(",")) - set(VARIANTS)
    if unknown:
        ap.error(f"unknown variants {sorted(unknown)}")
    threads, isa = torch.get_num_threads(), info["cpu_isa"]
    print(f"kdfused {kdfused.__version__} ({_commit()}), torch {torch.__version__}, "
          f"{threads} threads, CPU ISA {isa}, {platform.processor()}")  # fmt: skip
    results = {"commit": _commit(), "threads": torch.get_num_threads(), "isa": info["cpu_isa"],
               "rounds": a.rounds, "sizes": {}}  # fmt: skip
    for spec in a.sizes.split(","):
        dims, dt = spec.split(":")
        N, V = (int(x) for x in dims.split("x"))
        names = a.variants.split(",")
        res = time_size(N, V, DTYPES[dt], a.rounds, not a.no_reference, names)
        results["sizes"][spec] = res
        print(f"\n{N} x {V} {dt}, kd_loss forward + backward (kl, T=2, hard_weight=0.5), "
              f"{a.rounds} rounds:")  # fmt: skip
        print(f"  {'variant':26s} {'median ms':>10s} {'min-max ms':>17s} {'vs plain':>9s}")
        for name, r in res.items():
            spread = f"{r['min_ms']:.1f}-{r['max_ms']:.1f}"
            print(f"  {name:26s} {r['median_ms']:10.1f} {spread:>17s} {r['vs_plain']:8.2f}x")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
