"""Thread scaling of the CPU kernel for few long rows: fwd+bwd time with 1 and with 2 threads,
measured in one process, alternating, medians.

    python benchmarks/cpu_threads.py --rows 1 --vocab 256000 --reps 9

Also times the op alone (no autograd, no Python wrapper), and torch.exp as a gauge of what the
machine gives two threads at that moment (the cores are shared).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import kdfused
import kdfused._ops  # noqa: F401 - registers torch.ops.kdfused


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1)
    ap.add_argument("--vocab", type=int, default=256000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--divergence", default="kl")
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--inner", type=int, default=20, help="calls per timed sample")
    a = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    s = torch.randn(a.rows, a.vocab, generator=g).requires_grad_()
    t = torch.randn(a.rows, a.vocab, generator=g)
    y = torch.randint(0, a.vocab, (a.rows,), generator=g)

    def step() -> None:
        loss = kdfused.kd_loss(s, t, y, temperature=2.0, hard_weight=0.5, divergence=a.divergence)
        loss.backward()
        s.grad = None

    # The op alone (loss and gradient in one call, no autograd, no Python wrapper): what the
    # kernel's split of a row over threads gives, without the per-call overhead that does not
    # shrink with threads.
    op = torch.ops.kdfused.kd_loss.default
    sd, td = s.detach(), t.detach()

    def op_only() -> None:
        op(sd, td, y, 2.0, 1.0, 0.5, a.divergence, 0.5, -100, "batchmean", (), False, True, False)

    # What the machine gives two threads right now (shared cores): an ATen element-wise op of
    # the same kind on 16 x the elements, timed the same way.
    big = torch.randn(16 * a.rows * a.vocab)
    out = torch.empty_like(big)

    def calib() -> None:
        torch.exp(big, out=out)

    for name, fn in (
        ("kdfused fwd+bwd", step),
        ("kdfused op alone", op_only),
        ("torch.exp x16 (machine)", calib),
    ):
        times: dict[int, list[float]] = {1: [], a.threads: []}
        for n in times:  # warm-up
            torch.set_num_threads(n)
            for _ in range(3):
                fn()
        for _ in range(a.reps):
            for n in times:
                torch.set_num_threads(n)
                t0 = time.perf_counter()
                for _ in range(a.inner):
                    fn()
                times[n].append((time.perf_counter() - t0) / a.inner)
        m1 = statistics.median(times[1])
        mn = statistics.median(times[a.threads])
        print(
            f"N={a.rows} V={a.vocab} {a.divergence} {name}: 1 thread {m1 * 1e3:.3f} ms, "
            f"{a.threads} threads {mn * 1e3:.3f} ms, speed-up {m1 / mn:.2f}x"
        )


if __name__ == "__main__":
    main()
