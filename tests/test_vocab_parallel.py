"""Vocabulary-parallel loss (``process_group=``) in real process groups: gloo on CPU, groups of 1, 2
and 3 processes with uneven slices (tests/vp_worker.py runs the cases in each process).

Groups of 1 and 2 run the widest CPU instruction set, the group of 3 the scalar path. Every case
is compared, on every process, with the single-process loss on the whole rows and with
the float64 reference; the loss must be bitwise equal across processes. Bad input must raise on
every process. Each group runs under a timeout (collectives 60 s, the whole group 10 min), so a
bug fails the test instead of hanging the suite.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch.distributed as dist
from vp_worker import case_table

from conftest import RUN_SEED

pytestmark = [
    pytest.mark.fused_only,
    pytest.mark.skipif(
        not dist.is_available() or not dist.is_gloo_available(), reason="no gloo backend"
    ),
]

WORKER = os.path.join(os.path.dirname(__file__), "vp_worker.py")
CASES = list(case_table())
SPECIAL = [
    "error-label-range",
    "error-linear-label-range",
    "error-rows",
    "error-labels-differ",
    "error-dtype",
    "error-local",
    "compile-graph-break",
]
# The whole table in groups of 2 and 3; a group of 1 must simply work (a subset).
WORLD_CASES = {
    1: ["kl-batchmean-f64", "jsd-none-f64", "tvd-teacher-grad", "error-label-range"],
    2: CASES + SPECIAL,
    3: CASES + SPECIAL,
}


def _run_group(world: int, tmp_path) -> dict:
    store = tmp_path / "store"  # the group's rendezvous (gloo's FileStore); must not exist yet
    names = WORLD_CASES[world]
    procs, outs = [], []
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if world == 3:
        # The group of 3 runs the CPU scalar path (the CUDA kernels' per-element code), the others
        # the default (widest) instruction set: every case on both.
        env["KDFUSED_CPU_ISA"] = "scalar"
    for rank in range(world):
        out = tmp_path / f"rank{rank}.json"
        outs.append(out)
        cmd = [sys.executable, WORKER, str(rank), str(world), str(store), str(out)]
        cmd += [str(RUN_SEED % (2**31)), *names]
        procs.append(
            subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
        )
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=600)[0].decode(errors="replace"))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail(f"vocabulary-parallel group of {world} timed out")
    results = {}
    for rank, (p, out) in enumerate(zip(procs, outs)):
        if p.returncode != 0 or not out.exists():
            pytest.fail(f"rank {rank} of {world} exited with {p.returncode}:\n{logs[rank][-4000:]}")
        results[rank] = json.loads(out.read_text())
    return results


@pytest.fixture(scope="module")
def groups(tmp_path_factory):
    cache = {}

    def get(world):
        if world not in cache:
            cache[world] = _run_group(world, tmp_path_factory.mktemp(f"vp{world}"))
        return cache[world]

    return get


@pytest.mark.parametrize("world,case", [(w, c) for w, names in WORLD_CASES.items() for c in names])
def test_vocab_parallel(groups, world, case):
    results = groups(world)
    failures = [results[r][case] for r in range(world) if results[r].get(case) is not None]
    assert not failures, f"case {case} in a group of {world} (seed {RUN_SEED}):\n" + "\n".join(
        failures
    )
