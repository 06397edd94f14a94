"""Classifier-sized vocabularies on CPU: fwd+bwd time of kdfused, eager (F.kl_div +
F.cross_entropy) and torch.compile of the eager loss, in one process, alternating, medians.

    python benchmarks/small_vocab.py --rows 4096 --vocabs 10,100 --reps 9
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import kdfused

T, HARD = 2.0, 0.5


def eager_loss(s, t, y):
    soft = F.kl_div(
        F.log_softmax(s / T, -1), F.log_softmax(t / T, -1), reduction="batchmean", log_target=True
    )
    return soft * T * T + HARD * F.cross_entropy(s, y)


def fused_loss(s, t, y):
    return kdfused.kd_loss(s, t, y, temperature=T, hard_weight=HARD)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--vocabs", default="10,100")
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--inner", type=int, default=50, help="calls per timed sample")
    ap.add_argument("--no-compile", action="store_true")
    a = ap.parse_args()
    providers = {"kdfused": fused_loss, "eager": eager_loss}
    if not a.no_compile:
        providers["compile"] = torch.compile(eager_loss)
    print(f"threads={torch.get_num_threads()} isa={kdfused.build_info()['cpu_isa']}")
    for V in (int(v) for v in a.vocabs.split(",")):
        g = torch.Generator().manual_seed(V)
        s = torch.randn(a.rows, V, generator=g).requires_grad_()
        t = torch.randn(a.rows, V, generator=g)
        y = torch.randint(0, V, (a.rows,), generator=g)

        def step(fn, s=s, t=t, y=y):
            fn(s, t, y).backward()
            s.grad = None

        times: dict[str, list[float]] = {k: [] for k in providers}
        for fn in providers.values():
            for _ in range(3):
                step(fn)
        for _ in range(a.reps):
            for k, fn in providers.items():
                t0 = time.perf_counter()
                for _ in range(a.inner):
                    step(fn)
                times[k].append((time.perf_counter() - t0) / a.inner)
        med = {k: statistics.median(v) for k, v in times.items()}
        row = "  ".join(f"{k} {m * 1e6:8.1f} us" for k, m in med.items())
        ratio = med["kdfused"] / med["eager"]
        print(f"N={a.rows} V={V:>4} fwd+bwd: {row}  kdfused/eager {ratio:.2f}")


if __name__ == "__main__":
    main()
