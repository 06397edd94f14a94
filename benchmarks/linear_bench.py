"""Benchmark of kdfused.linear_kd_loss (fused linear + chunked KD loss) against materialised logits.

Providers (each run in its own subprocess, so that its peak memory is its own):
  kdfused-linear    kdfused.linear_kd_loss on the hidden states (no N x V logits)
  kdfused           F.linear logits, then kdfused.kd_loss
  eager             F.linear + F.kl_div(log_softmax) + F.cross_entropy
  compile           torch.compile of eager
  chunked-eager     torchtune-style chunked KD: per chunk of rows F.linear + log_softmax + KL
                    (+ CE), autograd through every chunk
  liger             Liger-Kernel's LigerFusedLinearJSDLoss (liger-kernel 0.8.5; --divergence jsd),
                    compiled=False: its chunk loop in eager PyTorch, its default 1024-row chunks
  liger-compiled    the same with compiled=True (its default: torch.compile of the chunk step)
  kdfused-liger     kdfused.integrations.liger.FusedLinearJSDLoss, the drop-in for the above
  trl               TRL's DistillationTrainer loss (trl 1.16.0: trl.trainer.distillation_trainer.
                    _chunked_divergence_loss, its chunked autograd function; --soft-only)
  kdfused-trl       kdfused.integrations.trl.chunked_divergence_loss, the drop-in for the above

Loss: 0.5 * T^2 * KL(teacher || student) + 0.5 * CE(student, labels), T = 2, batchmean, every row
valid; the teacher is (hidden, weight) without grad. With --divergence jsd the soft term is
0.5 * T^2 * JSD(beta = 0.5) instead (Liger's modules get weight_soft_loss = 0.5 * T^2, as they
apply no T^2), for the providers that compute it: kdfused-linear, kdfused and the liger ones.
With --soft-only the loss is the soft term alone without T^2 (TRL's: its trainer has no hard term
and no T^2 factor): soft weight 1/T^2, hard weight 0, and the trl providers join in.
Reported: median time of forward + backward, peak RSS above the inputs (peak RSS over the
measured runs, VmHWM after a reset, minus the RSS once the inputs exist; ru_maxrss where the
reset is not allowed), and the time of the four N x V x H GEMMs every provider needs (measured
alone) as a share of the total. The losses are printed, with how closely they agree.

--device cuda: the inputs are made on the CPU from the same generator and moved to the GPU (the
same values as the CPU run); every timed forward + backward (and every GEMM of the gemm row) sits
between torch.cuda.synchronize() calls; the peak is torch.cuda.max_memory_allocated() over the
measured runs (after reset_peak_memory_stats(), once the warm-up ran) minus
torch.cuda.memory_allocated() once the inputs exist (peak_source "cuda_max_allocated"): memory
the caching allocator hands out, not what it reserves, and what the warm-up leaves behind (the
cuBLAS workspace, kdfused's gradient cache) counts as on the CPU. The script sets no matmul
precision: fp32 GEMMs run at torch's default for every provider. On CUDA, trl's loss folds its
tiles with its Triton kernels (trl.kernels.chunked_divergence: _stats_kernel, _jsd_kernel,
_backward_kernel) when triton imports, else with its torch tile functions; its projections are
torch GEMMs into float32 tiles of 4096 tokens x 32768 vocabulary entries (trl 1.16.0), so at
N <= 4096, V <= 32768 one tile holds every logit of each model. Liger's LigerFusedLinearJSDLoss
has no CUDA kernel of its own: liger runs its chunk loop in eager PyTorch, liger-compiled the
torch.compile'd chunk step.

Every provider runs in its own subprocess; --timeout S stops one that runs longer than S seconds
and --deadline S bounds the whole run (a provider gets at most the time left; those that cannot
start are reported as skipped). A stopped provider is reported with status "timeout", one that
failed with status "error" and its last line of stderr.

    python benchmarks/linear_bench.py --quick
    python benchmarks/linear_bench.py --out benchmarks/results/linear-cpu
    python benchmarks/linear_bench.py --divergence jsd --size 1024,512,8192
    python benchmarks/linear_bench.py --divergence jsd --soft-only
    python benchmarks/linear_bench.py --device cuda --divergence jsd --soft-only --timeout 60
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import os
import platform
import resource
import signal
import statistics
import subprocess
import sys
import time

from _procinfo import reset_hwm, status_kib

PROVIDERS = ["kdfused-linear", "kdfused", "eager", "compile", "chunked-eager"]
JSD_PROVIDERS = ["kdfused-linear", "kdfused", "kdfused-liger", "liger", "liger-compiled"]
SOFT_ONLY_PROVIDERS = ["kdfused-linear", "kdfused-trl", "trl", "kdfused-liger", "liger-compiled"]
TRL_PROVIDERS = {"trl", "kdfused-trl"}  # jsd, soft only
KL_ONLY = {"eager", "compile", "chunked-eager"}
T, SOFT, HARD = 2.0, 0.5, 0.5
BETA = 0.5  # the JSD's beta with --divergence jsd
CHUNKED_EAGER_ROWS = 512  # rows per chunk of the torchtune-style loss
MIN_PROVIDER_S = 5.0  # --deadline: a provider is not started with less time left than this


def _peak_mib(reset: bool) -> float:
    if reset:
        return status_kib("VmHWM") / 1024.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _make(N, H, V, dtype, device="cpu"):
    """The inputs, made on the CPU (the same values on every device) and moved to ``device``."""
    import torch

    g = torch.Generator().manual_seed(0)
    sh = torch.randn(N, H, generator=g, dtype=dtype)
    sw = torch.randn(V, H, generator=g, dtype=dtype) * (3.0 / H**0.5)
    th = torch.randn(N, H, generator=g, dtype=dtype)
    tw = torch.randn(V, H, generator=g, dtype=dtype) * (3.0 / H**0.5)
    y = torch.randint(0, V, (N,), generator=g)
    sh, sw, th, tw, y = (x.to(device) for x in (sh, sw, th, tw, y))
    return sh.requires_grad_(), sw.requires_grad_(), th, tw, y


def _sync(device):
    if device != "cpu":
        import torch

        torch.cuda.synchronize()


def _eager(sh, sw, th, tw, y):
    import torch
    import torch.nn.functional as F

    s = F.linear(sh, sw)
    with torch.no_grad():
        t = F.linear(th, tw)
    kl = F.kl_div(
        F.log_softmax(s / T, -1), F.log_softmax(t / T, -1), reduction="batchmean", log_target=True
    )
    return SOFT * T * T * kl + HARD * F.cross_entropy(s, y)


def _chunked_eager(sh, sw, th, tw, y):
    import torch
    import torch.nn.functional as F

    total = sh.new_zeros((), dtype=torch.float32)
    for h_c, th_c, y_c in zip(
        sh.split(CHUNKED_EAGER_ROWS), th.split(CHUNKED_EAGER_ROWS), y.split(CHUNKED_EAGER_ROWS)
    ):
        s = F.linear(h_c, sw).float()
        with torch.no_grad():
            t = F.linear(th_c, tw).float()
        log_q = F.log_softmax(s / T, -1)
        log_p = F.log_softmax(t / T, -1)
        kl = (log_p.exp() * (log_p - log_q)).sum()
        total = total + SOFT * T * T * kl + HARD * F.cross_entropy(s, y_c, reduction="sum")
    return total / sh.shape[0]


def _weights(soft_only):
    """(soft weight, hard weight): soft only is the soft term without T^2 and no hard term."""
    return (1.0 / (T * T), 0.0) if soft_only else (SOFT, HARD)


def _liger_options(soft_only):
    # Liger's JSD has no T^2 factor: the soft weight carries it, so the loss is the one above
    soft, hard = _weights(soft_only)
    return dict(weight_hard_loss=hard, weight_soft_loss=soft * T * T, beta=BETA, temperature=T)


def _provider_loss(provider, N, opts, soft_only, device):
    """The provider's loss as a function of (student hidden, student weight, teacher hidden,
    teacher weight, labels); ``opts``: kdfused's options."""
    import torch
    import torch.nn.functional as F

    import kdfused

    if provider in TRL_PROVIDERS:
        if provider == "trl":
            from trl.trainer.distillation_trainer import _chunked_divergence_loss as trl_loss
        else:
            from kdfused.integrations.trl import chunked_divergence_loss as trl_loss
        ones = torch.ones(1, N, dtype=torch.long, device=device)

        def trl_one_sequence(sh, sw, th, tw, y):
            # (1, N, H): one sequence of N completion tokens, all in the loss
            loss, _, _ = trl_loss(sh[None], th[None], sw, tw, ones, BETA, temperature=T)
            return loss

        return trl_one_sequence
    if provider == "kdfused-linear":
        return functools.partial(kdfused.linear_kd_loss, **opts)
    if provider == "kdfused":

        def materialised(sh, sw, th, tw, y):
            s = F.linear(sh, sw)
            with torch.no_grad():
                t = F.linear(th, tw)
            return kdfused.kd_loss(s, t, y, **opts)

        return materialised
    if provider == "kdfused-liger":
        from kdfused.integrations.liger import FusedLinearJSDLoss

        return FusedLinearJSDLoss(**_liger_options(soft_only))
    if provider in ("liger", "liger-compiled"):
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        compiled = provider == "liger-compiled"
        return LigerFusedLinearJSDLoss(**_liger_options(soft_only), compiled=compiled)
    if provider == "eager":
        return _eager
    if provider == "compile":
        return torch.compile(_eager)
    if provider == "chunked-eager":
        return _chunked_eager
    raise SystemExit(f"unknown provider {provider}")


def worker(provider, N, H, V, dtype_name, repeats, divergence="kl", soft_only=False, device="cpu"):
    import torch

    dtype = getattr(torch, dtype_name)
    sh, sw, th, tw, y = _make(N, H, V, dtype, device)
    soft, hard = _weights(soft_only)
    opts = dict(temperature=T, soft_weight=soft, hard_weight=hard, divergence=divergence)
    if divergence == "jsd":
        opts["beta"] = BETA
    if divergence != "kl" and provider in KL_ONLY:
        raise SystemExit(f"provider {provider} computes divergence kl only")
    if soft_only and provider in KL_ONLY:
        raise SystemExit(f"provider {provider} computes the soft and hard terms")
    if divergence != "jsd" and provider in ("kdfused-liger", "liger", "liger-compiled"):
        raise SystemExit(f"provider {provider} computes divergence jsd only")
    if provider in TRL_PROVIDERS and not (divergence == "jsd" and soft_only):
        raise SystemExit(f"provider {provider} computes the soft jsd only (--soft-only)")
    if provider == "gemm":
        return gemm_worker(sh, sw, th, tw, repeats, device)
    loss_of = _provider_loss(provider, N, opts, soft_only, sh.device)

    def fn():
        return loss_of(sh, sw, th, tw, y)

    # Peak above the inputs: RSS (CUDA: allocated bytes) once the inputs exist is the base; the
    # peak is taken over the measured runs (after a warm-up run, which also compiles for "compile"
    # and Triton). What the warm-up leaves behind (kdfused's gradient cache, the compiled code, the
    # cuBLAS workspace) counts.
    cuda = device != "cpu"
    _sync(device)
    base = torch.cuda.memory_allocated() / 2**20 if cuda else status_kib("VmRSS") / 1024.0
    times, loss, reset = [], None, False
    for i in range(repeats + 1):  # the first run warms up (allocator, oneDNN primitives)
        sh.grad = sw.grad = None
        if i == 1:
            if cuda:
                _sync(device)
                torch.cuda.reset_peak_memory_stats()
            else:
                reset = reset_hwm()
        _sync(device)
        t0 = time.perf_counter()
        loss = fn()
        loss.backward()
        _sync(device)
        dt = time.perf_counter() - t0
        if i:
            times.append(dt)
    if cuda:
        peak, source = torch.cuda.max_memory_allocated() / 2**20 - base, "cuda_max_allocated"
    else:
        peak, source = _peak_mib(reset) - base, "VmHWM" if reset else "ru_maxrss"
    row = dict(
        provider=provider,
        ms=1e3 * statistics.median(times),
        ms_all=[1e3 * t for t in times],
        peak_mib=peak,
        loss=loss.item(),
        peak_source=source,
        threads=torch.get_num_threads(),
    )
    if cuda:
        row["device_name"] = torch.cuda.get_device_name()
    print(json.dumps(row))


def gemm_worker(sh, sw, th, tw, repeats, device="cpu"):
    """The four GEMMs of forward + backward (student and teacher logits, grad_hidden,
    grad_weight), full size, timed alone (on CUDA each between two synchronisations)."""
    import torch

    sh, sw = sh.detach(), sw.detach()
    with torch.no_grad():
        g = sh @ sw.t()
        times = []
        for i in range(repeats + 1):
            dt = 0.0
            for f in (lambda: sh @ sw.t(), lambda: th @ tw.t(), lambda: g @ sw, lambda: g.t() @ sh):
                _sync(device)
                t0 = time.perf_counter()
                out = f()
                _sync(device)
                dt += time.perf_counter() - t0
                del out
            if i:
                times.append(dt)
    print(json.dumps(dict(provider="gemm", ms=1e3 * statistics.median(times))))


def run_one(
    provider, N, H, V, dtype, repeats, divergence="kl", soft_only=False, device="cpu", timeout=None
):
    """One provider in its own process: its row; status "timeout" when it ran past ``timeout``
    seconds (its process group killed), "error" when it failed."""
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--worker",
        provider,
        str(N),
        str(H),
        str(V),
        dtype,
        str(repeats),
        divergence,
        str(int(soft_only)),
        device,
    ]
    p = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        stdout, stderr = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)  # the worker and whatever it started (compile workers)
        p.communicate()
        return dict(provider=provider, status="timeout", error=[f"stopped after {timeout:.3g} s"])
    if p.returncode != 0:
        return dict(provider=provider, status="error", error=stderr.strip().splitlines()[-1:])
    return json.loads(stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument(
        "--worker",
        nargs=9,
        metavar=("PROVIDER", "N", "H", "V", "DTYPE", "REPEATS", "DIVERGENCE", "SOFT_ONLY", "DEV"),
    )
    ap.add_argument(
        "--quick", action="store_true", help="one small case (N, H, V) = (512, 256, 8000)"
    )
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument(
        "--divergence",
        choices=["kl", "jsd"],
        default="kl",
        help=f"the soft term; jsd: beta = {BETA}, default providers {','.join(JSD_PROVIDERS)}",
    )
    ap.add_argument(
        "--soft-only",
        action="store_true",
        help="the soft term alone, without T^2 (TRL's loss; with --divergence jsd), "
        f"default providers {','.join(SOFT_ONLY_PROVIDERS)}",
    )
    ap.add_argument("--size", help="one case N,H,V (default 4096,1024,32000)")
    ap.add_argument("--providers", default=None, help=f"default {','.join(PROVIDERS)}")
    ap.add_argument("--out", help="write OUT.csv and OUT.json")
    ap.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default="cpu",
        help="cuda: the same inputs on the GPU, synchronised timing, peak allocated bytes",
    )
    ap.add_argument(
        "--timeout", type=float, help="seconds a provider's process may run (default: no limit)"
    )
    ap.add_argument(
        "--deadline",
        type=float,
        help="seconds for the whole run: a provider gets at most the time left, and those that "
        "cannot start any more are reported as skipped (results are written all the same)",
    )
    args = ap.parse_args()
    if args.worker:
        p, N, H, V, dt, r, div, so, dev = args.worker
        return worker(p, int(N), int(H), int(V), dt, int(r), div, bool(int(so)), dev)
    t_start = time.monotonic()
    if args.soft_only and args.divergence != "jsd":
        ap.error("--soft-only computes TRL's loss: give --divergence jsd")
    sizes = [(512, 256, 8000)] if args.quick else [(4096, 1024, 32000)]
    if args.size:
        sizes = [tuple(int(x) for x in args.size.split(","))]
    default = PROVIDERS
    if args.divergence == "jsd":
        default = SOFT_ONLY_PROVIDERS if args.soft_only else JSD_PROVIDERS
    providers = args.providers or ",".join(default)
    rows = []

    def limit():  # (seconds this provider may run, or None; False when the deadline is spent)
        left = None if args.deadline is None else args.deadline - (time.monotonic() - t_start)
        if left is not None and left < MIN_PROVIDER_S:
            return False
        return min(x for x in (args.timeout, left, float("inf")) if x is not None)

    def one(prov, *extra):
        t = limit()
        if t is False:
            return dict(provider=prov, status="skipped", error=["the deadline was reached"])
        t = None if t == float("inf") else t
        return run_one(prov, N, H, V, args.dtype, args.repeats, *extra, timeout=t)

    for N, H, V in sizes:
        gemm = one("gemm", "kl", False, args.device)
        for prov in providers.split(","):
            r = one(prov, args.divergence, args.soft_only, args.device)
            r.update(N=N, H=H, V=V, dtype=args.dtype, divergence=args.divergence)
            r.update(soft_only=args.soft_only, device=args.device)
            if "ms" in r and "ms" in gemm:
                r["gemm_share"] = gemm["ms"] / r["ms"]
            rows.append(r)
            print(json.dumps(r), flush=True)
    by = {(r["N"], r["H"], r["V"], r["provider"]): r for r in rows}
    print(f"\n{'N,H,V':>18} {'provider':>15} {'ms':>9} {'peak MiB':>9} {'gemm%':>6} {'loss':>12}")
    for r in rows:
        if "ms" not in r:
            print(f"{r['provider']}: {r.get('status', 'failed')}: {r.get('error')}")
            continue
        share = f"{100 * r['gemm_share']:6.1f}" if "gemm_share" in r else f"{'-':>6}"
        print(
            f"{r['N']},{r['H']},{r['V']:>7} {r['provider']:>15} {r['ms']:9.1f} "
            f"{r['peak_mib']:9.1f} {share} {r['loss']:12.6f}"
        )
    for N, H, V in sizes:
        losses = [r["loss"] for r in rows if "loss" in r and (r["N"], r["H"], r["V"]) == (N, H, V)]
        if len(losses) > 1:
            spread = (max(losses) - min(losses)) / max(abs(x) for x in losses)
            print(f"({N}, {H}, {V}): losses of {len(losses)} providers agree to {spread:.2e} rel.")
        lin, mat = by.get((N, H, V, "kdfused-linear")), by.get((N, H, V, "kdfused"))
        eag, com = by.get((N, H, V, "eager")), by.get((N, H, V, "compile"))
        if all(x and "ms" in x for x in (lin, mat, eag, com)):
            print(
                f"({N}, {H}, {V}): memory vs kdfused {lin['peak_mib'] / mat['peak_mib']:.3f}, "
                f"vs eager {lin['peak_mib'] / eag['peak_mib']:.3f}; time vs kdfused "
                f"{lin['ms'] / mat['ms']:.3f}x, speed-up vs compile {com['ms'] / lin['ms']:.2f}x"
            )
    if args.out:
        import torch

        from _report import git_commit

        meta = dict(
            commit=git_commit(),
            torch=torch.__version__,
            machine=platform.machine(),
            cpus=os.cpu_count(),
            device=args.device,
            command=" ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:]),
        )
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out + ".json", "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)
        keys = [
            "N",
            "H",
            "V",
            "dtype",
            "divergence",
            "soft_only",
            "provider",
            "ms",
            "peak_mib",
            "gemm_share",
            "loss",
            "threads",
        ]
        with open(args.out + ".csv", "w", newline="") as f:
            w = csv.DictWriter(f, keys, extrasaction="ignore")
            w.writeheader()
            w.writerows(r for r in rows if "ms" in r)


if __name__ == "__main__":
    main()
