#!/usr/bin/env python
"""The product on a GPU beyond single calls: a process group, streams, CUDA graphs. A step of
benchmarks/gpu_check.sh; each check prints one PASS/FAIL line and the last line sums them up.

    python benchmarks/gpu_runtime.py nccl    [--device cuda|cpu]
    python benchmarks/gpu_runtime.py streams [--device cuda|cpu]

nccl: ``kd_loss`` and ``linear_kd_loss`` with ``process_group=`` a world-size-1 group (nccl on a
GPU, gloo on the CPU) against the same call without a group: loss and gradients, bitwise or within
a tight tolerance (the vocabulary-parallel steps are other kernels than the fused one, so their
sums may round differently; the line says which).

streams: a ``kd_loss`` forward + backward on a non-default stream equals the same on the default
stream (bitwise); a training step (linear student head -> kd_loss -> backward -> SGD) captured in a
CUDA graph and replayed on new data gives the parameters that the same steps give eagerly.

With ``--device cpu`` the same code runs with gloo, no streams and no capture: that checks the
script itself (what the rehearsal of gpu_check.sh does) and says nothing about a GPU.
Exit status: 0 every check passed, 1 one failed.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import traceback

import torch

import kdfused

RESULTS: list[tuple[str, bool, str]] = []


def check(name: str):
    def deco(fn):
        def run(*a, **k):
            try:
                ok, detail = fn(*a, **k)
            except Exception as exc:  # noqa: BLE001 -- a check that raises is a FAIL, with why
                ok, detail = False, f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                traceback.print_exc()
            RESULTS.append((name, ok, detail))
            print(f"{'PASS' if ok else 'FAIL'} {name}: {detail}", flush=True)

        return run

    return deco


def compare(pairs, rtol: float, atol: float) -> tuple[bool, str]:
    """(within tolerance, 'bitwise' or the largest difference) over (name, got, want) pairs."""
    worst, where, bitwise = 0.0, "", True
    for name, got, want in pairs:
        if got is None or want is None:
            return False, f"{name}: missing ({got is None}, {want is None})"
        bitwise = bitwise and torch.equal(got, want)
        g, w = got.double(), want.double()
        if not (torch.isfinite(g).all() and torch.isfinite(w).all()):
            return False, f"{name}: non-finite values"
        diff = (g - w).abs()
        # equal elements count 0 (not 0/0 = NaN, which max() would spread and `>` then ignore:
        # a zero-tolerance comparison must fail on any difference)
        ratio = torch.where(diff == 0, torch.zeros_like(diff), diff / (atol + rtol * w.abs()))
        err = ratio.max().item() if g.numel() else 0.0
        if err > worst:
            worst, where = err, name
    if bitwise:
        return True, "bitwise equal"
    return worst <= 1.0, f"not bitwise; largest difference {worst:.2g} x tolerance ({where})"


def inputs(device, n=64, v=5003, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(n, v, generator=g) * 3).to(device, dtype)
    t = (torch.randn(n, v, generator=g) * 3).to(device, dtype)
    y = torch.randint(0, v, (n,), generator=g)
    y[::7] = -100
    return s, t, y.to(device)


# ------------------------------------------------------------------------------------ nccl
def run_nccl(device: str) -> None:
    import torch.distributed as dist

    backend = "nccl" if device == "cuda" else "gloo"
    with tempfile.TemporaryDirectory() as tmp:
        store = dist.FileStore(os.path.join(tmp, "store"), 1)
        if device == "cuda":
            torch.cuda.set_device(0)
        dist.init_process_group(backend, store=store, rank=0, world_size=1)
        try:
            group = dist.group.WORLD
            print(f"process group: {backend}, world size {dist.get_world_size(group)}")
            for div, red in (("kl", "batchmean"), ("jsd", "sum"), ("tvd", "none")):
                nccl_kd_loss(device, group, div, red)
            nccl_linear(device, group)
        finally:
            dist.destroy_process_group()


def _kd_call(device, group, div, red):
    s, t, y = inputs(device)
    s.requires_grad_()
    kw = dict(temperature=2.0, soft_weight=0.7, hard_weight=0.3, divergence=div, reduction=red)
    loss = kdfused.kd_loss(s, t, y, process_group=group, **kw)
    loss.backward(torch.ones_like(loss))
    return loss.detach(), s.grad


def nccl_kd_loss(device, group, div, red):
    @check(f"kd_loss process_group {div} {red}")
    def run():
        got = _kd_call(device, group, div, red)
        want = _kd_call(device, None, div, red)
        return compare([("loss", got[0], want[0]), ("grad", got[1], want[1])], 1e-5, 1e-7)

    run()


def nccl_linear(device, group):
    @check("linear_kd_loss process_group kl")
    def run():
        outs = []
        for pg in (group, None):
            g = torch.Generator().manual_seed(1)
            h = torch.randn(48, 64, generator=g).to(device).requires_grad_()
            w = (torch.randn(3001, 64, generator=g) / 8).to(device).requires_grad_()
            th = torch.randn(48, 64, generator=g).to(device)
            tw = (torch.randn(3001, 64, generator=g) / 8).to(device)
            y = torch.randint(0, 3001, (48,), generator=g).to(device)
            loss = kdfused.linear_kd_loss(
                h, w, th, tw, y, temperature=2.0, hard_weight=0.5, chunk_size=16, process_group=pg
            )
            loss.backward()
            outs.append((loss.detach(), h.grad, w.grad))
        (a, b) = outs
        pairs = [("loss", a[0], b[0]), ("grad_hidden", a[1], b[1]), ("grad_weight", a[2], b[2])]
        return compare(pairs, 1e-5, 1e-6)

    run()


# ------------------------------------------------------------------------------------ streams
def run_streams(device: str) -> None:
    cuda = device == "cuda"

    @check("kd_loss forward+backward on a non-default stream")
    def side_stream():
        kw = dict(temperature=2.0, hard_weight=0.5, divergence="jsd")
        s, t, y = inputs(device, n=256, v=32000)
        want_s = s.clone().requires_grad_()
        want = kdfused.kd_loss(want_s, t, y, **kw)
        want.backward()
        got_s = s.clone().requires_grad_()
        stream = torch.cuda.Stream() if cuda else None
        if cuda:
            stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream) if cuda else contextlib.nullcontext():
            got = kdfused.kd_loss(got_s, t, y, **kw)
            got.backward()
        if cuda:
            torch.cuda.current_stream().wait_stream(stream)
            torch.cuda.synchronize()
        return compare([("loss", got, want), ("grad", got_s.grad, want_s.grad)], 0.0, 0.0)

    side_stream()

    @check("CUDA graph capture and replay of a training step (head -> kd_loss -> SGD)")
    def graph():
        return graph_training_step(device)

    graph()


def graph_training_step(device):
    """Captures ``logits = x W^T; kd_loss(logits, t, y).backward(); SGD step`` once, replays it on
    new data, and compares the parameters with the same steps run eagerly."""
    cuda = device == "cuda"
    n, h, v, steps = 128, 64, 8192, 4
    g = torch.Generator().manual_seed(2)
    w0 = (torch.randn(v, h, generator=g) / 8).to(device)
    data = [
        (
            torch.randn(n, h, generator=g).to(device),
            (torch.randn(n, v, generator=g) * 2).to(device),
            torch.randint(0, v, (n,), generator=g).to(device),
        )
        for _ in range(steps)
    ]
    kw = dict(temperature=2.0, soft_weight=0.5, hard_weight=0.5, reduction="mean")

    def make():
        w = torch.nn.Parameter(w0.clone())
        return w, torch.optim.SGD([w], lr=0.5)

    def step(w, opt, x, t, y):
        opt.zero_grad(set_to_none=False)
        loss = kdfused.kd_loss(x @ w.t(), t, y, **kw)
        loss.backward()
        opt.step()
        return loss

    # eager
    w_e, opt_e = make()
    eager_losses = [step(w_e, opt_e, *d).detach() for d in data]

    # captured: static inputs, warm-up on a side stream (as torch.cuda.graphs asks), capture, replay
    w_g, opt_g = make()
    sx, st, sy = (z.clone() for z in data[0])
    w_g.grad = torch.zeros_like(w_g)
    if cuda:
        warm = torch.cuda.Stream()
        warm.wait_stream(torch.cuda.current_stream())
        w_tmp, opt_tmp = make()
        w_tmp.grad = torch.zeros_like(w_tmp)
        with torch.cuda.stream(warm):
            for _ in range(3):
                step(w_tmp, opt_tmp, sx, st, sy)
        torch.cuda.current_stream().wait_stream(warm)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_loss = step(w_g, opt_g, sx, st, sy)
        replay = graph.replay
    else:  # the CPU stand-in: the same static-buffer choreography, run eagerly
        box = {}

        def replay():
            box["loss"] = step(w_g, opt_g, sx, st, sy)

        static_loss = None
    # The capture itself did not run the step: replay once per batch.
    graph_losses = []
    for x, t, y in data:
        sx.copy_(x)
        st.copy_(t)
        sy.copy_(y)
        replay()
        graph_losses.append((static_loss if cuda else box["loss"]).detach().clone())
    if cuda:
        torch.cuda.synchronize()
    pairs = [(f"loss {i}", a, b) for i, (a, b) in enumerate(zip(graph_losses, eager_losses))]
    pairs.append(("weights after the steps", w_g.detach(), w_e.detach()))
    return compare(pairs, 1e-5, 1e-6)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("what", choices=["nccl", "streams"])
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no GPU present")
        return 3
    print(f"torch {torch.__version__}, kdfused build {kdfused.build_info()}, device {args.device}")
    {"nccl": run_nccl, "streams": run_streams}[args.what](args.device)
    n_ok = sum(ok for _, ok, _ in RESULTS)
    bad = [name for name, ok, _ in RESULTS if not ok]
    print(
        f"RESULT: {n_ok}/{len(RESULTS)} checks passed"
        + (f"; FAILED: {', '.join(bad)}" if bad else "")
        + ("" if args.device == "cuda" else " (CPU stand-in: the script's own plumbing)")
    )
    return 0 if RESULTS and not bad else 1


if __name__ == "__main__":
    sys.exit(main())
