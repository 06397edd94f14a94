"""Small pytest-benchmark suite that doubles as a correctness smoke check.

    pytest benchmarks/test_bench.py                       # time + check (CPU; CUDA if present)
    pytest benchmarks/test_bench.py --benchmark-disable   # check only, each case run once

Every (device, size, provider) first checks the provider's loss and student gradient against
``kdfused.reference`` evaluated in float64, then times forward (``torch.no_grad()``) and
forward + backward. pytest-benchmark groups the timings by size and mode so that the providers
are compared side by side. ``torch.compile`` is only run at the smallest size (it compiles for
tens of seconds per shape on a CPU); Liger-Kernel's providers only on CUDA when installed.
"""

from __future__ import annotations

import os
import secrets
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _providers as P  # noqa: E402

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")),
]
SIZES = [(256, 1000, torch.float32), (512, 32000, torch.float32), (256, 32000, torch.bfloat16)]
PROVIDERS = ["kdfused", "eager", "compile", "liger_kl", "liger_jsd"]
DTYPE_NAME = {torch.float32: "fp32", torch.bfloat16: "bf16"}
# Fresh inputs every run; KDFUSED_TEST_SEED=<n> replays one (the seed is in every failure message).
SEED = int(os.environ.get("KDFUSED_TEST_SEED") or secrets.randbits(48))


def _inputs(n, v, dtype, device):
    gen = torch.Generator(device=device).manual_seed(SEED)
    s = (2 * torch.randn(n, v, generator=gen, device=device)).to(dtype).requires_grad_(True)
    t = (2 * torch.randn(n, v, generator=gen, device=device)).to(dtype)
    y = torch.randint(0, v, (n,), generator=gen, device=device)
    return s, t, y


def _reference(s, t, y):
    """Loss and student gradient from kdfused.reference in float64."""
    ref = P.load_reference()
    s64 = s.detach().double().requires_grad_(True)
    loss = ref.kd_loss(
        s64,
        t.double(),
        y,
        temperature=P.TEMPERATURE,
        soft_weight=P.SOFT_WEIGHT,
        hard_weight=P.HARD_WEIGHT,
    )
    loss.backward()
    return loss.item(), s64.grad


def _provider_or_skip(name, device):
    try:
        return P.make(name, device)
    except P.Unavailable as exc:
        pytest.skip(str(exc))


@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("size", SIZES, ids=lambda z: f"{z[0]}x{z[1]}-{DTYPE_NAME[z[2]]}")
@pytest.mark.parametrize("device", DEVICES)
def test_bench(benchmark, device, size, provider, mode):
    n, v, dtype = size
    if provider == "compile" and size != SIZES[0]:
        pytest.skip("torch.compile is benchmarked at the smallest size only (compile time)")
    fn = _provider_or_skip(provider, device)
    s, t, y = _inputs(n, v, dtype, device)

    # Correctness before timing: loss and gradient against the float64 reference.
    ref_loss, ref_grad = _reference(s, t, y)
    loss = fn(s, t, y)
    loss.backward()
    tol = 2e-5 if dtype == torch.float32 else 3e-2
    assert abs(loss.item() - ref_loss) <= tol * max(1.0, abs(ref_loss)), (
        loss.item(),
        ref_loss,
        f"KDFUSED_TEST_SEED={SEED}",
    )
    err = (s.grad.double() - ref_grad).abs().max().item()
    assert err <= tol * ref_grad.abs().max().item(), (
        f"max grad error {err:.3g} (KDFUSED_TEST_SEED={SEED})"
    )

    def clear():
        s.grad = None

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    def fwd():
        with torch.no_grad():
            fn(s, t, y)
        sync()

    def fwdbwd():
        fn(s, t, y).backward()
        sync()

    benchmark.group = f"{mode} {n}x{v} {DTYPE_NAME[dtype]} {device}"
    benchmark.extra_info.update(provider=provider, N=n, V=v, dtype=DTYPE_NAME[dtype])
    rounds = max(5, min(50, (1 << 24) // (n * v)))  # more rounds for the tiny, noisier cases
    benchmark.pedantic(
        fwd if mode == "fwd" else fwdbwd, setup=clear, rounds=rounds, warmup_rounds=1
    )
