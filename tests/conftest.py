"""Shared fixtures for the kdfused test suite.

Implementation under test: the fused op (``kdfused.kd_loss``) by default. ``--kd-impl=reference``
(or KDFUSED_TEST_IMPL=reference) runs the semantic tests against ``kdfused.reference.kd_loss``
instead; tests that need the compiled op (custom-op checks, KDLoss, torch.compile) are then
skipped. Every device-parametrised test runs on "cpu" and on "cuda"; "cuda" is skipped when
torch.cuda.is_available() is False.

Randomness: one seed per test run, fresh each run (or KDFUSED_TEST_SEED=<n> to replay one),
printed in the pytest header. Each test's own seed (the ``seed`` fixture, printed with a failure)
is derived from it and the test's node id, so one test can be replayed alone:
``KDFUSED_TEST_SEED=<n> pytest 'tests/test_x.py::test_y[...]'``.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))


def _run_seed() -> int:
    env = os.environ.get("KDFUSED_TEST_SEED", "").strip()
    if env:
        return int(env)
    seed = secrets.randbits(48)
    # The processes started later inherit it: pytest-xdist's workers (so that the seed printed by
    # the main process replays their tests) and the tests' own subprocesses.
    os.environ["KDFUSED_TEST_SEED"] = str(seed)
    return seed


RUN_SEED = _run_seed()

_CUDA = torch.cuda.is_available()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not _CUDA, reason="no GPU"))]


def pytest_addoption(parser):
    parser.addoption(
        "--kd-impl",
        choices=["fused", "reference"],
        default=None,
        help="implementation under test (default: fused, or $KDFUSED_TEST_IMPL)",
    )


def _seed_line() -> str:
    return f"kdfused test seed: {RUN_SEED} (replay with KDFUSED_TEST_SEED={RUN_SEED})"


def pytest_report_header(config):
    return _seed_line()


def pytest_terminal_summary(terminalreporter):
    # again at the end: `pytest -q` prints no header
    terminalreporter.write_line(_seed_line())


def seed_for(nodeid: str) -> int:
    """The seed of the test `nodeid` in this run (stable across processes, unlike hash())."""
    digest = hashlib.blake2b(f"{RUN_SEED}:{nodeid}".encode(), digest_size=6).digest()
    return int.from_bytes(digest, "little")


def pytest_configure(config):
    # hypothesis draws its examples from the run's seed too (unless --hypothesis-seed is given)
    if hasattr(config.option, "hypothesis_seed") and config.option.hypothesis_seed is None:
        config.option.hypothesis_seed = RUN_SEED
    config.addinivalue_line("markers", "fused_only: needs the compiled kdfused op")


def _impl_name(config) -> str:
    return config.getoption("--kd-impl") or os.environ.get("KDFUSED_TEST_IMPL", "fused")


def pytest_collection_modifyitems(config, items):
    if _impl_name(config) == "reference":
        skip = pytest.mark.skip(reason="needs the fused op (--kd-impl=reference)")
        for item in items:
            if "fused_only" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def impl_name(pytestconfig) -> str:
    return _impl_name(pytestconfig)


@pytest.fixture(scope="session")
def kd_loss(impl_name):
    """The kd_loss function under test."""
    if impl_name == "reference":
        from kdfused import reference

        return reference.kd_loss
    import kdfused

    return kdfused.kd_loss


@pytest.fixture(scope="session")
def kdfused_mod():
    import kdfused

    return kdfused


def _poison_allocator(device: str) -> None:
    """Fills, then frees, blocks of memory with NaN so that an output element the op forgets to
    write (e.g. the gradient of an ignored row) reads as NaN rather than as a lucky 0. On CUDA the
    caching allocator hands these blocks straight back; on the CPU malloc may reuse them."""
    sizes = [1 << 10, 1 << 14, 1 << 18, 1 << 20, 1 << 22] if device == "cpu" else [1 << 26]
    blocks = [torch.full((n,), float("nan"), dtype=torch.float32, device=device) for n in sizes]
    del blocks


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    _poison_allocator(request.param)
    return request.param


@pytest.fixture(autouse=True)
def _seed_global_rng(request):
    """torch's global generator (used by tests that draw without `gen`) seeded per test too."""
    torch.manual_seed(seed_for(request.node.nodeid))


@pytest.fixture
def seed(request) -> int:
    """This test's seed: derived from the run's seed and the test's node id; printed so that a
    failure can be reproduced (the run seed is in the pytest header)."""
    sd = seed_for(request.node.nodeid)
    print(f"seed = {sd} (KDFUSED_TEST_SEED={RUN_SEED})")
    return sd


@pytest.fixture
def gen(seed) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


@pytest.fixture
def isa(request):
    """The CPU instruction set ``request.param`` forced for the test (indirect parametrisation:
    ``@pytest.mark.parametrize("isa", ISAS, indirect=True)``), restored afterwards."""
    import kdfused
    from kdfused import _C

    before = kdfused.build_info()["cpu_isa"]
    _C.set_cpu_isa(request.param)
    yield request.param
    _C.set_cpu_isa(before)
