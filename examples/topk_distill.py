"""Offline distillation from a stored top-k teacher, on scikit-learn's 8x8 digits (no download).

1. Train a teacher MLP on the digits.
2. Store its top-k per transfer-set example to a .pt file, as a teacher server would send it:
   kdfused.topk_teacher(values="logprobs", index_dtype=torch.int32, value_dtype=torch.bfloat16):
   k of the 10 classes, indices int32, values the teacher's log_softmax(logits / T) at them in
   bfloat16. The teacher is then deleted and the file reloaded.
3. Train the same small student several ways, from the same initialisation and batches:
     hard               labels only (cross-entropy)
     full_kd            distilled from the teacher's full logits (kdfused.kd_loss), kept in memory
     topk_full          from the stored file, support="full": the student's log-softmax over all
                        classes against the teacher renormalised over its k entries
     topk_renormalized  support="renormalized": both sides renormalised over the k entries (TRL's
                        server distillation with loss_add_tail=False)
     topk_tail          support="tail": the k entries plus a tail bucket with the rest of the
                        mass on each side (TRL's loss_add_tail=True); computed from the student's
                        hidden features and output layer with kdfused.linear_topk_kd_loss, which
                        never materialises the logits
   and report test accuracy of each, and its difference from the full-logit student's.

    python examples/topk_distill.py            # about 6 s on 2 CPU cores
    python examples/topk_distill.py --quick    # a smoke run (about 5 s)

The student is deliberately small and trained on a small transfer set (200 of the 1297 training
digits), where soft targets help most. Committed results: examples/results/topk_distill.json.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

import kdfused


def load_digits_split(seed: int):
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    y = torch.tensor(y, dtype=torch.int64)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(y), generator=g)
    n_test = 500
    te, tr = perm[:n_test], perm[n_test:]
    return x[tr], y[tr], x[te], y[te]


def mlp(sizes, dropout=0.0):
    layers = []
    for a, b in zip(sizes[:-2], sizes[1:-1]):
        layers += [nn.Linear(a, b), nn.ReLU()] + ([nn.Dropout(dropout)] if dropout else [])
    layers.append(nn.Linear(sizes[-2], sizes[-1]))
    return nn.Sequential(*layers)


def accuracy(model, x, y) -> float:
    model.eval()
    with torch.no_grad():
        return (model(x).argmax(-1) == y).float().mean().item()


def train(model, x, y, epochs, lr, loss_fn, seed, batch=64):
    """loss_fn(model, inputs, batch_indices, labels) -> scalar."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        model.train()
        for b in torch.randperm(len(y), generator=g).split(batch):
            opt.zero_grad(set_to_none=True)
            loss_fn(model, x[b], b, y[b]).backward()
            opt.step()
    return model


def on_logits(fn):
    """A loss of the logits, fn(logits, batch_indices, labels), as train() takes it."""
    return lambda model, xb, b, y: fn(model(xb), b, y)


def store_topk(full_logits, k: int, temperature: float, path: str) -> int:
    """The teacher's top-k as a server would send it (int32 indices, bfloat16 log-probs at the
    distillation temperature: with values="logprobs" the loss applies no temperature to the
    teacher), saved to ``path``; returns the file's size in bytes."""
    idx, logprobs = kdfused.topk_teacher(
        full_logits,
        k,
        temperature=temperature,
        values="logprobs",
        index_dtype=torch.int32,
        value_dtype=torch.bfloat16,
    )
    torch.save({"indices": idx, "values": logprobs, "k": k, "temperature": temperature}, path)
    return os.path.getsize(path)


def run(
    quick: bool = False,
    k: int = 3,
    temperature: float = 4.0,
    seed: int = 0,
    store_path: str | None = None,
    verbose: bool = True,
) -> dict:
    t0 = time.perf_counter()
    # Tiny models: one thread is faster than several (and does not fight other processes).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(quick, k, temperature, seed, store_path, verbose, t0)
    finally:
        torch.set_num_threads(threads)


def _run(quick, k, temperature, seed, store_path, verbose, t0):
    torch.manual_seed(seed)
    x_tr, y_tr, x_te, y_te = load_digits_split(seed)
    n_transfer = 120 if quick else 200  # a small transfer set: where soft targets help most
    x_small, y_small = x_tr[:n_transfer], y_tr[:n_transfer]

    # 1. teacher, on the whole training split
    teacher = train(
        mlp([64, 256, 256, 10], dropout=0.2),
        x_tr,
        y_tr,
        epochs=8 if quick else 40,
        lr=1e-3,
        loss_fn=on_logits(lambda out, b, y: F.cross_entropy(out, y)),
        seed=seed,
    )
    acc = {"teacher": accuracy(teacher, x_te, y_te)}
    teacher.eval()
    with torch.no_grad():
        full_logits = teacher(x_small)

    # 2. store the top-k teacher, forget the model, reload the file
    path = store_path or os.path.join(tempfile.mkdtemp(prefix="kdfused_topk_"), "teacher_topk.pt")
    file_bytes = store_topk(full_logits, k, temperature, path)
    del teacher
    stored = torch.load(path)
    s_idx, s_vals = stored["indices"], stored["values"]

    # 3. students: same init, same batches
    epochs = 30 if quick else 150
    init = mlp([64, 32, 10]).state_dict()
    kw = dict(temperature=temperature, soft_weight=0.7, hard_weight=0.3)

    def student():
        m = mlp([64, 32, 10])
        m.load_state_dict(init)
        return m

    def topk(support):
        return on_logits(
            lambda out, b, y: kdfused.topk_kd_loss(
                out, s_idx[b], s_vals[b], y, support=support, values="logprobs", **kw
            )
        )

    def linear_topk_tail(model, xb, b, y):
        # The student's output layer fused with the loss: hidden features and the head's
        # weight and bias go in, no logits come out.
        head = model[-1]
        return kdfused.linear_topk_kd_loss(
            model[:-1](xb), head.weight, s_idx[b], s_vals[b], y, student_bias=head.bias,
            support="tail", values="logprobs", **kw,
        )  # fmt: skip

    losses = {
        "student_hard": on_logits(lambda out, b, y: F.cross_entropy(out, y)),
        "student_full_kd": on_logits(
            lambda out, b, y: kdfused.kd_loss(out, full_logits[b], y, **kw)
        ),
        "student_topk_full": topk("full"),
        "student_topk_renormalized": topk("renormalized"),
        "student_topk_tail": linear_topk_tail,
    }
    for name, fn in losses.items():
        acc[name] = accuracy(train(student(), x_small, y_small, epochs, 3e-3, fn, seed), x_te, y_te)
    # Each student against the one distilled from the full logits (what storing top-k replaces).
    vs_full = {
        name: round(a - acc["student_full_kd"], 4)
        for name, a in acc.items()
        if name.startswith("student_topk")
    }

    out = {
        "accuracy": acc,
        "accuracy_minus_full_kd": vs_full,
        "stored": "indices int32, values bfloat16 log-probs at the temperature",
        "k": k,
        "classes": 10,
        "temperature": temperature,
        "transfer_set": n_transfer,
        "test_set": len(y_te),
        "stored_file_bytes": file_bytes,
        "stored_path": path,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    if verbose:
        print(
            f"digits: teacher trained on {len(y_tr)}, students on {n_transfer} examples, "
            f"test {len(y_te)}; top-{k} of 10 classes (int32 indices, bfloat16 log-probs) stored "
            f"in {file_bytes} bytes ({path})"
        )
        for name, a in acc.items():
            gap = vs_full.get(name)
            gap = "" if gap is None else f"  ({gap * 100:+.1f} points vs student_full_kd)"
            print(f"  {name:26s} test accuracy {a * 100:5.1f}%{gap}")
        print(f"  ({out['seconds']} s)")
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a short smoke run")
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--temperature", type=float, default=4.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--store",
        default=None,
        help="where to write the top-k file (default: a temporary directory)",
    )
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = ap.parse_args(argv)
    np.random.seed(args.seed)
    out = run(args.quick, args.k, args.temperature, args.seed, args.store)
    if args.json:
        saved = {k: v for k, v in out.items() if k != "stored_path" or args.store}
        with open(args.json, "w") as f:
            json.dump(saved, f, indent=1)
    return out


if __name__ == "__main__":
    main()
