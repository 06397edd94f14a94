"""What the compiled extension was built with, and the check that runs before it is loaded.

A compiled PyTorch extension only loads into the torch it was compiled against: loaded into
another one it fails with an undefined symbol, or crashes later. So ``setup.py`` writes
``kdfused/_build_meta.py`` next to ``kdfused._C`` whenever it builds it (in place, into a wheel,
or for an editable install): the version with its local label, the torch it was compiled against
(``torch.__version__`` in full, local label included: ``2.14.1+cu130`` is not ``2.14.1+cpu``),
torch's C++ ABI, and whether the CUDA kernels were compiled. The record is plain Python, read
without loading the extension.

``import kdfused`` puts a finder on ``sys.meta_path`` that compares the record with the running
torch when ``kdfused._C`` is about to be imported (before the shared library is opened) and
raises ImportError naming both versions and the rebuild command on a mismatch.
``KDFUSED_SKIP_TORCH_CHECK=1`` skips the comparison (at the risk of the failure it prevents).
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any, Optional

PACKAGE = __name__.rpartition(".")[0]
EXTENSION = f"{PACKAGE}._C"

# --no-cache-dir: pip reuses a wheel it built earlier from the same sdist (of an index), for
# whatever torch it was built
REBUILD = (
    "pip install --no-build-isolation --no-deps --force-reinstall --no-cache-dir "
    "<kdfused checkout or sdist>"
)


def build_record() -> Optional[dict[str, Any]]:
    """The record written when the extension was built, or None where there is none (a checkout
    whose extension was never built, or was built before records existed)."""
    try:
        meta = importlib.import_module(f"{PACKAGE}._build_meta")
    except ImportError:
        return None
    return dict(meta.BUILD)


def torch_mismatch(record: dict[str, Any]) -> Optional[str]:
    """Why the extension recorded in `record` cannot load into the running torch (None if it
    can)."""
    import torch

    running = str(torch.__version__)
    built = record.get("torch_version")
    where = os.path.dirname(os.path.abspath(__file__))
    if built != running:
        problem = f"was built against torch {built}, but this environment has torch {running}"
    else:
        abi = record.get("torch_cxx11_abi")
        running_abi = bool(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", abi))
        if abi is None or abi == running_abi:
            return None
        problem = (
            f"was built against a torch {built} with _GLIBCXX_USE_CXX11_ABI={int(abi)}, but "
            f"this environment's torch {running} has _GLIBCXX_USE_CXX11_ABI={int(running_abi)}"
        )
    return (
        f"kdfused {record.get('version')} ({where}) {problem}. A compiled PyTorch extension only "
        "loads into the torch it was built with: rebuild kdfused against this torch with\n"
        f"    {REBUILD}\n"
        "or, in a kdfused checkout, `make install` (or `python setup.py build_ext --inplace`). "
        "KDFUSED_SKIP_TORCH_CHECK=1 skips this check (the extension may then fail to load or "
        "crash)."
    )


def check_torch() -> None:
    """Raises ImportError if the built extension does not match the running torch."""
    if os.environ.get("KDFUSED_SKIP_TORCH_CHECK", "").strip() not in ("", "0"):
        return
    record = build_record()
    if record is None:
        return
    message = torch_mismatch(record)
    if message is not None:
        raise ImportError(message, name=EXTENSION)


class _TorchCheckFinder:
    """A meta path finder that finds nothing: it runs `check_torch` when the extension is about
    to be imported, and leaves the import itself to the usual finders."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname == EXTENSION:
            check_torch()
        return None


def install_import_check() -> None:
    if not any(type(f).__name__ == "_TorchCheckFinder" for f in sys.meta_path):
        sys.meta_path.insert(0, _TorchCheckFinder())


def build_info() -> dict[str, Any]:
    """How this build was compiled.

    version            the full version, with the local label of the build
                       (``0.3.0+torch2.14.1.cu130``, ``0.3.0+torch2.14.1.cpu``)
    torch              the torch version the extension was compiled against
    torch_cuda         that torch's CUDA version (None for a CPU build of torch)
    cuda               whether the CUDA kernels were compiled (False: the CPU-only package)
    cuda_arch_list     the GPU architectures compiled (TORCH_CUDA_ARCH_LIST), None without CUDA
    cpu_isa, cpu_isa_compiled, openmp
                       the CPU instruction set in use, those compiled, OpenMP
    """
    from . import _C

    info = dict(_C.build_info())
    record = build_record() or {}
    info["version"] = record.get("version")
    info["torch"] = record.get("torch_version")
    info["torch_cuda"] = record.get("torch_cuda")
    info["cuda_arch_list"] = record.get("cuda_arch_list")
    return info
