"""Peak memory of a small CPU training loop: a student MLP producing N x V logits, a frozen
teacher MLP, a distillation loss, backward, an optimizer step. One subprocess per loss
(kdfused, eager F.kl_div + F.cross_entropy, torch.compile of the eager loss), so that every peak
is the process's own.

Two peaks, both above the resident set once the models, optimizer and inputs exist:
  run    -- ru_maxrss at the end, minus that baseline: everything, torch.compile's compilation
            included;
  steady -- VmHWM after the first (warm-up) steps, reset through /proc/self/clear_refs: the
            training loop's own peak once compiled and warm.

    python benchmarks/train_memory.py --rows 1024 --vocab 32000 --steps 4
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys

from _procinfo import reset_hwm, status_kib

PROVIDERS = ("kdfused", "eager", "compile")


def child(provider: str, N: int, V: int, d: int, steps: int, warmup: int) -> dict:
    import torch
    import torch.nn.functional as F

    import kdfused

    torch.manual_seed(0)
    T, hard = 2.0, 0.5

    def eager_loss(s, t, y):
        soft = F.kl_div(
            F.log_softmax(s / T, -1),
            F.log_softmax(t / T, -1),
            reduction="batchmean",
            log_target=True,
        )
        return soft * T * T + hard * F.cross_entropy(s, y)

    def fused_loss(s, t, y):
        return kdfused.kd_loss(s, t, y, temperature=T, hard_weight=hard)

    loss_fn = {"kdfused": fused_loss, "eager": eager_loss, "compile": torch.compile(eager_loss)}[
        provider
    ]

    def mlp():
        return torch.nn.Sequential(torch.nn.Linear(d, d), torch.nn.GELU(), torch.nn.Linear(d, V))

    student, teacher = mlp(), mlp().requires_grad_(False)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-3)
    x = torch.randn(N, d)
    y = torch.randint(0, V, (N,))
    losses = []

    def step():
        with torch.no_grad():
            t = teacher(x)
        loss = loss_fn(student(x), t, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss))

    base = status_kib("VmRSS")
    for _ in range(warmup):
        step()
    reset = reset_hwm()
    for _ in range(steps):
        step()
    return {
        "provider": provider,
        "run_mib": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024,
        "steady_mib": (status_kib("VmHWM") - base) / 1024 if reset else float("nan"),
        "loss": losses[-1],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--providers", default=",".join(PROVIDERS))
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.child, a.rows, a.vocab, a.hidden, a.steps, a.warmup)))
        return
    nv_mib = a.rows * a.vocab * 4 / 2**20
    print(
        f"N={a.rows} V={a.vocab} hidden={a.hidden} fp32, {a.warmup} warm-up + {a.steps} steps;"
        f" one N x V fp32 tensor = {nv_mib:.0f} MiB"
    )
    print(f"{'provider':>10} {'run peak MiB':>13} {'steady peak MiB':>16} {'(x N*V)':>8}  loss")
    for prov in a.providers.split(","):
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--child",
                prov,
                "--rows",
                str(a.rows),
                "--vocab",
                str(a.vocab),
                "--hidden",
                str(a.hidden),
                "--steps",
                str(a.steps),
                "--warmup",
                str(a.warmup),
            ],
            capture_output=True,
            text=True,
            env=os.environ.copy(),
        )
        if out.returncode != 0:
            print(f"{prov:>10} failed: {out.stderr.strip().splitlines()[-1:]}")
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(
            f"{prov:>10} {r['run_mib']:13.0f} {r['steady_mib']:16.0f} "
            f"{r['steady_mib'] / nv_mib:8.2f}  {r['loss']:.4f}"
        )


if __name__ == "__main__":
    main()
