"""CPU results must not depend on the thread count. Rows are done one per thread when there are
many, and split over threads (chunks in parallel, their statistics merged in chunk order) when
there are few; both paths run the same operations in the same order, so 1 and 2 threads must
give bitwise-equal losses and gradients, for every compiled instruction set."""

from __future__ import annotations

import pytest
import torch

import kdfused
from kdfused import _C

ISAS = kdfused.build_info()["cpu_isa_compiled"]


def test_kernels_use_torchs_threads():
    """at::parallel_for is a header template compiled into the extension: built without OpenMP
    (when torch uses OpenMP) it would run every kernel on one thread whatever
    torch.set_num_threads says, and the thread-count tests below would compare 1 thread with 1."""
    before = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            assert _C.parallel_threads() == n
    finally:
        torch.set_num_threads(before)


def _run(s, t, y, threads, kw):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        s1 = s.clone().requires_grad_()
        t1 = t.clone().requires_grad_()
        loss = kdfused.kd_loss(s1, t1, y, **kw)
        loss.backward()
        return loss, s1.grad, t1.grad
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("isa", ISAS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
# 1 row of 5 chunks and 3 rows of 3 chunks (split over 2 threads), 9 rows (one per thread).
@pytest.mark.parametrize("N,V", [(1, 5 * 2048 + 7), (3, 3 * 2048 + 1), (9, 4 * 2048 + 3)])
@pytest.mark.parametrize("divergence", ["kl", "ce", "reverse_kl", "jsd", "tvd"])
def test_one_and_two_threads_are_bitwise_equal(isa, dtype, N, V, divergence):
    g = torch.Generator().manual_seed(N * 1000 + V)
    s = (torch.randn(N, V, generator=g) * 4).to(dtype)
    t = (torch.randn(N, V, generator=g) * 4).to(dtype)
    t[0, : V // 3] = float("-inf")  # masked teacher vocabulary, whole chunks of it
    if divergence == "reverse_kl":
        s[0, : V // 3] = float("-inf")
    y = torch.randint(0, V, (N,), generator=g)
    y[0] = V - 1  # outside the mask
    if N > 1:
        y[1] = -100
    kw = dict(temperature=2.5, soft_weight=0.7, hard_weight=0.4, divergence=divergence, beta=0.3)
    one = _run(s, t, y, 1, kw)
    two = _run(s, t, y, 2, kw)
    assert torch.isfinite(one[0])
    for a, b in zip(one, two):
        assert torch.equal(a, b)
