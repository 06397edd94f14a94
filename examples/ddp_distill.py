"""Data-parallel distillation with kdfused under DistributedDataParallel.

    torchrun --standalone --nproc-per-node 2 examples/ddp_distill.py

Each process takes its shard of every global batch, computes ``kdfused.kd_loss`` on its own rows
(nothing distributed about the loss itself: the rows are whole on every process), and DDP
averages the gradients. Runs on CPU with gloo, and unchanged on GPUs with nccl (one GPU per
process). ``--check`` then trains the same student in one process on the concatenated batches and
compares the parameters: data-parallel kdfused trains exactly like single-process kdfused (up to
the order in which DDP sums the gradients).
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import kdfused

T, SOFT, HARD = 4.0, 0.7, 0.3


def mlp(d_in: int, hidden: int, classes: int, seed: int, dtype) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(d_in, hidden),
        nn.ReLU(),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Linear(hidden, classes),
    ).to(dtype)


def batches(steps: int, batch: int, d_in: int, classes: int, teacher: nn.Module, dtype):
    """The global batches (the same on every process): inputs, teacher logits, labels."""
    g = torch.Generator().manual_seed(1234)
    out = []
    for _ in range(steps):
        x = torch.randn(batch, d_in, generator=g).to(dtype)
        with torch.no_grad():
            t = teacher(x)
        y = torch.randint(0, classes, (batch,), generator=g)
        out.append((x, t, y))
    return out


def train(model, data, device, lr: float, shard=None) -> list[float]:
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    losses = []
    for x, t, y in data:
        if shard is not None:
            x, t, y = (z.chunk(shard[1])[shard[0]] for z in (x, t, y))
        x, t, y = x.to(device), t.to(device), y.to(device)
        opt.zero_grad(set_to_none=True)
        loss = kdfused.kd_loss(model(x), t, y, temperature=T, soft_weight=SOFT, hard_weight=HARD)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=512, help="global batch (split over processes)")
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--float64", action="store_true", help="train in float64 (exact --check)")
    ap.add_argument("--check", action="store_true", help="compare with one-process training")
    args = ap.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else "cpu"
    if cuda:
        torch.cuda.set_device(device)
    if args.batch % world:
        raise SystemExit(f"--batch {args.batch} must be divisible by the {world} processes")
    dtype = torch.float64 if args.float64 else torch.float32
    d_in = 64

    teacher = mlp(d_in, 4 * args.hidden, args.classes, seed=0, dtype=dtype).eval()
    data = batches(args.steps, args.batch, d_in, args.classes, teacher, dtype)
    student = mlp(d_in, args.hidden, args.classes, seed=1, dtype=dtype).to(device)
    ddp = DDP(student, device_ids=[device.index] if cuda else None)

    t0 = time.perf_counter()
    losses = train(ddp, data, device, args.lr, shard=(rank, world))
    elapsed = time.perf_counter() - t0
    if rank == 0:
        every = max(1, args.steps // 10)
        for i in range(0, args.steps, every):
            print(f"step {i:4d}  loss (rank 0's shard) {losses[i]:.5f}")
        print(f"{world} processes, {args.steps} steps in {elapsed:.1f} s")

    if args.check and rank == 0:
        single = mlp(d_in, args.hidden, args.classes, seed=1, dtype=dtype).to(device)
        train(single, data, device, args.lr)
        worst = max(
            (a - b).abs().max().item() / max(b.abs().max().item(), 1e-30)
            for a, b in zip(student.parameters(), single.parameters())
        )
        tol = 1e-9 if args.float64 else 1e-4
        print(
            f"parameters vs one process on the whole batches: max relative difference {worst:.2e}"
        )
        if not worst <= tol:
            raise SystemExit(
                f"data-parallel training differs from one process: {worst:.2e} > {tol}"
            )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
