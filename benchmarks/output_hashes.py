#!/usr/bin/env python
"""Bitwise fingerprints of kdfused's outputs on a fixed set of calls, to show that a change which
must not change results (a refactor, a build change) did not.

    python benchmarks/output_hashes.py --write before.json     # on the old tree
    python benchmarks/output_hashes.py --check before.json     # on the new tree: exit 1 on a change

The calls: ``kd_loss`` on every compiled CPU instruction set (forced) x every divergence x every
reduction x dtype pairs (float32, bfloat16, float16 x float32, float32 x bfloat16, float64), at a
short-row and a long-row shape, with ignored rows and, for some, masked (-inf) columns and teacher
gradients; ``topk_kd_loss`` (kl, ce; every reduction; float32 and bfloat16); ``linear_kd_loss``
(every divergence; batchmean and none); ``kd_loss`` with ``process_group=`` a world-size-1 gloo
group. Each call's loss and gradients are hashed (SHA-256 of their bytes). Inputs come from fixed
seeds, so two runs of the same build give the same file.

Compare only on one machine type: the instruction sets a machine lacks are left out, and the
linear op's GEMMs come from torch's BLAS, whose bits may depend on the processor (the file records
the machine, and --check says when it differs).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import tempfile

import torch

import kdfused
from kdfused import _C

DIVS = ("kl", "ce", "reverse_kl", "jsd", "tvd")
REDS = ("batchmean", "mean", "sum", "none")
PAIRS = {
    "f32": (torch.float32, torch.float32),
    "bf16": (torch.bfloat16, torch.bfloat16),
    "f16xf32": (torch.float16, torch.float32),
    "f32xbf16": (torch.float32, torch.bfloat16),
    "f64": (torch.float64, torch.float64),
}
SHAPES = {"short": (33, 1031), "long": (5, 40000)}


def digest(*tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        if t is None:
            h.update(b"none")
            continue
        h.update(str((t.dtype, tuple(t.shape))).encode())
        t = t.detach().contiguous().cpu().reshape(-1)
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:24]


def logits(shape, dtype, seed, mask=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 3
    if mask:
        x[..., 3::11] = float("-inf")
    return x.to(dtype)


def labels(n, v, seed):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, v, (n,), generator=g)
    y[::5] = -100
    return y


def kd_calls(out, isa):
    _C.set_cpu_isa(isa)
    try:
        for sname, (n, v) in SHAPES.items():
            for pname, (sd, td) in PAIRS.items():
                for div in DIVS:
                    for red in REDS:
                        seed = sum(map(ord, f"{sname}{pname}{div}{red}"))
                        mask = div in ("kl", "tvd")
                        s = logits((n, v), sd, seed, mask).requires_grad_()
                        t = logits((n, v), td, seed + 1, mask).requires_grad_(div != "ce")
                        y = labels(n, v, seed + 2)
                        loss = kdfused.kd_loss(
                            s,
                            t,
                            y,
                            temperature=2.0,
                            soft_weight=0.7,
                            hard_weight=0.3,
                            divergence=div,
                            beta=0.3,
                            reduction=red,
                        )
                        loss.backward(torch.full_like(loss, 0.75))
                        out[f"kd_loss/{isa}/{sname}/{pname}/{div}/{red}"] = digest(
                            loss, s.grad, t.grad
                        )
    finally:
        _C.set_cpu_isa("auto")


def topk_calls(out, isa):
    _C.set_cpu_isa(isa)
    try:
        for dt in (torch.float32, torch.bfloat16):
            for div in ("kl", "ce"):
                for red in REDS:
                    seed = sum(map(ord, f"{dt}{div}{red}"))
                    n, v, k = 29, 5003, 8
                    s = logits((n, v), dt, seed).requires_grad_()
                    idx, val = kdfused.topk_teacher(logits((n, v), dt, seed + 1), k)
                    y = labels(n, v, seed + 2)
                    loss = kdfused.topk_kd_loss(
                        s, idx, val, y, temperature=2.0, hard_weight=0.4, divergence=div,
                        reduction=red,
                    )  # fmt: skip
                    loss.backward(torch.full_like(loss, 0.75))
                    out[f"topk/{isa}/{dt}/{div}/{red}"] = digest(loss, s.grad, idx, val)
    finally:
        _C.set_cpu_isa("auto")


def linear_calls(out):
    for dt in (torch.float32, torch.float64):
        for div in DIVS:
            for red in ("batchmean", "none"):
                g = torch.Generator().manual_seed(sum(map(ord, f"{dt}{div}{red}")))
                h = torch.randn(40, 32, generator=g, dtype=dt).requires_grad_()
                w = (torch.randn(3001, 32, generator=g, dtype=dt) / 6).requires_grad_()
                b = torch.randn(3001, generator=g, dtype=dt).requires_grad_()
                th = torch.randn(40, 32, generator=g, dtype=dt)
                tw = torch.randn(3001, 32, generator=g, dtype=dt) / 6
                y = labels(40, 3001, 7)
                loss = kdfused.linear_kd_loss(
                    h, w, th, tw, y, student_bias=b, temperature=2.0, hard_weight=0.5,
                    divergence=div, reduction=red, chunk_size=16,
                )  # fmt: skip
                loss.backward(torch.full_like(loss, 0.75))
                out[f"linear/{dt}/{div}/{red}"] = digest(loss, h.grad, w.grad, b.grad)


def parallel_calls(out):
    import torch.distributed as dist

    with tempfile.TemporaryDirectory() as tmp:
        store = dist.FileStore(os.path.join(tmp, "store"), 1)
        dist.init_process_group("gloo", store=store, rank=0, world_size=1)
        try:
            for div in DIVS:
                for red in ("batchmean", "none"):
                    seed = sum(map(ord, f"vp{div}{red}"))
                    s = logits((21, 2053), torch.float32, seed).requires_grad_()
                    t = logits((21, 2053), torch.float32, seed + 1)
                    y = labels(21, 2053, seed + 2)
                    loss = kdfused.kd_loss(
                        s, t, y, temperature=2.0, hard_weight=0.5, divergence=div, reduction=red,
                        process_group=dist.group.WORLD,
                    )  # fmt: skip
                    loss.backward(torch.full_like(loss, 0.75))
                    out[f"vocab_parallel/{div}/{red}"] = digest(loss, s.grad)
        finally:
            dist.destroy_process_group()


def machine() -> str:
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
        model = next(
            (x.split(":", 1)[1].strip() for x in info.splitlines() if "model name" in x), ""
        )
        has = [x for x in ("avx2", "avx512f", "avx512bw", "fma") if f" {x}" in info]
        flags = f"{model} ({', '.join(has)})"
    except OSError:
        pass
    return f"{platform.machine()} {flags}".strip()


def collect() -> dict:
    out: dict = {}
    for isa in kdfused.build_info()["cpu_isa_compiled"]:
        kd_calls(out, isa)
        topk_calls(out, isa)
    linear_calls(out)
    parallel_calls(out)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--write", metavar="FILE")
    g.add_argument("--check", metavar="FILE")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    got = collect()
    meta = {"machine": machine(), "torch": torch.__version__, "build": kdfused.build_info()}
    if args.write:
        with open(args.write, "w") as f:
            json.dump({"meta": meta, "hashes": got}, f, indent=1, sort_keys=True)
        print(f"{len(got)} call fingerprints written to {args.write} ({meta['machine']})")
        return 0
    with open(args.check) as f:
        ref = json.load(f)
    if ref["meta"]["machine"] != meta["machine"]:
        print(f"note: recorded on {ref['meta']['machine']!r}, checked on {meta['machine']!r}")
    common = sorted(set(got) & set(ref["hashes"]))
    changed = [k for k in common if got[k] != ref["hashes"][k]]
    only = sorted(set(got) ^ set(ref["hashes"]))
    for k in changed:
        print(f"CHANGED {k}")
    print(
        f"{len(common)} calls compared: {len(changed)} changed"
        + (f"; {len(only)} in one file only (e.g. {only[0]})" if only else "")
    )
    return 1 if changed or not common else 0


if __name__ == "__main__":
    sys.exit(main())
