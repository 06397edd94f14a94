"""The fused-vs-reference comparison of examples/mnist_distill.py: the same student trained with
kdfused.kd_loss and with kdfused.reference.kd_loss from the same seed, the two losses on one batch,
their time per batch measured alternately, and the time spent in the loss during training."""

from __future__ import annotations

import math
import time
from typing import Callable

import numpy as np
import torch
import torch.nn as nn


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class TimedLoss:
    """A loss function that keeps the time spent in it: its forward call, and its backward from
    the moment autograd reaches the loss until the gradient of the student logits is ready (tensor
    hooks; CUDA is synchronised at each end). The training step calls it like the loss itself."""

    def __init__(self, fn: Callable, device) -> None:
        self.fn, self.device, self.seconds = fn, torch.device(device), 0.0

    def _now(self) -> float:
        _sync(self.device)
        return time.perf_counter()

    def __call__(self, student, teacher, labels=None, **kw):
        t0 = self._now()
        loss = self.fn(student, teacher, labels, **kw)
        self.seconds += self._now() - t0
        if loss.requires_grad and student.requires_grad:
            start = []
            loss.register_hook(lambda g: start.append(self._now()))
            student.register_hook(lambda g: self._stop(start))
        return loss

    def _stop(self, start: list) -> None:
        if start:
            self.seconds += self._now() - start.pop()


def compare_on_batch(
    kd: Callable,
    ref: Callable,
    model: nn.Module,
    x: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float,
) -> dict:
    """Loss and logit-gradient of two loss implementations on one batch, same inputs (float32),
    and the reference's loss in float64 as the exact value."""
    logits = model(x).detach()
    vals, grads = [], []
    for fn in (kd, ref):
        z = logits.clone().requires_grad_()
        loss = fn(z, teacher_logits, None, temperature=temperature)
        loss.backward()
        vals.append(float(loss.detach()))
        grads.append(z.grad)
    exact = float(ref(logits.double(), teacher_logits.double(), None, temperature=temperature))
    return {
        "first_batch_loss_kdfused": vals[0],
        "first_batch_loss_reference": vals[1],
        "first_batch_loss_float64": exact,
        "first_batch_max_abs_grad_diff": float((grads[0] - grads[1]).abs().max()),
        "first_batch_max_abs_grad": float(grads[1].abs().max()),
    }


def time_losses(
    fns: dict,
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float,
    rounds: int = 10,
    reps: int = 20,
) -> dict:
    """Milliseconds per loss forward + backward for each function in ``fns``, measured in
    alternating rounds so that all of them see the same machine load; median over rounds."""
    dev = student_logits.device
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            _sync(dev)
            t0 = time.perf_counter()
            for _ in range(reps):
                z = student_logits.detach().requires_grad_()
                fn(z, teacher_logits, None, temperature=temperature).backward()
            _sync(dev)
            times[name].append((time.perf_counter() - t0) / reps * 1e3)
    return {name: float(np.median(t)) for name, t in times.items()}


def reference_check(
    a: dict, b: dict, steps_a: list, steps_b: list, epochs: int, first_batch: dict, ms: dict
) -> dict:
    """The comparison of the kdfused run ``a`` with the reference run ``b`` (histories from
    ``train``, their per-step losses), the first-batch comparison and the interleaved times."""
    diff = np.abs(np.subtract(a["train_loss"], b["train_loss"]))
    per_step = np.abs(np.subtract(steps_a, steps_b))
    n = math.ceil(len(per_step) / epochs)  # steps per epoch
    return {
        **first_batch,
        "max_abs_diff_step_loss_per_epoch": [
            float(per_step[i : i + n].max()) for i in range(0, len(per_step), n)
        ],
        "step_loss_first_epoch_kdfused": steps_a[:n],
        "step_loss_first_epoch_reference": steps_b[:n],
        "max_abs_diff_epoch_loss": float(np.max(diff)),
        "max_rel_diff_epoch_loss": float(np.max(diff / np.abs(b["train_loss"]))),
        "test_errors_kdfused": a["test_errors"],
        "test_errors_reference": b["test_errors"],
        "loss_seconds_kdfused": a["loss_seconds"],
        "loss_seconds_reference": b["loss_seconds"],
        "loss_ms_per_batch_interleaved_kdfused": ms["kdfused"],
        "loss_ms_per_batch_interleaved_reference": ms["reference"],
    }
