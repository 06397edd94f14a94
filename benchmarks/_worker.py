"""In-process measurements for ``run.py``: one (case, provider) at a time.

``run.py`` starts this code in a fresh subprocess (``run.py --worker SPEC``) so that peak memory
on the CPU can be read from the operating system, and a provider that runs out of memory or
crashes takes only its own process down. Each measurement prints one ``@@RESULT {json}`` line.

Times:
    fwd      ``fn(s, t, y)`` under ``torch.no_grad()``: the loss value only.
    fwdbwd   ``fn(s, t, y).backward()`` with the student logits requiring grad: loss + gradient.
Each is warmed up (this is where ``torch.compile`` compiles), then repeated; we report median,
20th and 80th percentile. CUDA times come from CUDA events, CPU times from ``perf_counter``.

Peak memory "above the inputs" (student, teacher, labels are allocated before the baseline):
    cuda  ``torch.cuda.max_memory_allocated()`` minus ``memory_allocated()`` at the baseline.
    cpu   the process's resident-set high-water mark (``VmHWM``, reset through
          ``/proc/self/clear_refs``) minus its resident set (``VmRSS``) at the baseline, after
          ``malloc_trim`` so that freed heap pages are not silently reused.
The fwd+bwd peak includes the N x V gradient of the student logits, which every provider must
produce, so its floor is ``N * V * element size``.
"""

from __future__ import annotations

import gc
import json
import math
import os
import resource
import sys
import time
import traceback

import torch

import _providers as P
from _procinfo import meminfo_kib, peak_rss_mib, reset_hwm, status_kib

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MIB = float(1 << 20)


# --------------------------------------------------------------------------- CPU memory helpers
def cpu_memory_method() -> str:
    ok = status_kib("VmHWM") is not None and reset_hwm()
    return "rss" if ok else "unavailable"


def limit_cpu_memory(fraction: float = 0.9) -> None:
    """Cap this process's address space so that running out of memory raises a clean
    allocation error (reported as "oom") instead of waking the kernel's OOM killer."""
    avail = meminfo_kib("MemAvailable")
    size = status_kib("VmSize")
    if avail is None or size is None:
        return
    cap = (size + int(avail * fraction)) * 1024 + (2 << 30)  # + 2 GiB for thread stacks etc.
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard == resource.RLIM_INFINITY or cap < hard:
        resource.setrlimit(resource.RLIMIT_AS, (cap, hard))


# --------------------------------------------------------------------------- timing
def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _once(call, device: str) -> float:
    """Seconds taken by one ``call()``."""
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        call()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    call()
    return time.perf_counter() - t0


def time_call(
    call, before, device: str, warmup: int, target_s: float, min_reps: int, max_reps: int
) -> dict:
    """Warm up, then repeat ``before(); call()`` (only ``call`` timed) enough times to fill
    about ``target_s`` seconds (within [min_reps, max_reps])."""
    first = None
    last = 0.0
    for i in range(max(1, warmup)):
        before()
        _sync(device)
        last = _once(call, device)
        first = last if i == 0 else first
    reps = int(min(max_reps, max(min_reps, math.ceil(target_s / max(last, 1e-6)))))
    times = []
    for _ in range(reps):
        before()
        _sync(device)
        times.append(_once(call, device))
    q = torch.tensor(times, dtype=torch.float64)
    return {
        "median_ms": float(q.median()) * 1e3,
        "p20_ms": float(q.quantile(0.2)) * 1e3,
        "p80_ms": float(q.quantile(0.8)) * 1e3,
        "reps": reps,
        "first_call_s": first,
    }


def peak_extra_mib(call, before, device: str) -> float | None:
    """Peak memory of one ``call()`` above what is allocated just before it, in MiB."""
    before()
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        call()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / MIB
    return peak_rss_mib(call)


# --------------------------------------------------------------------------- measurements
OOM_WORDS = ("out of memory", "not enough memory", "can't allocate", "cannot allocate")


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, (MemoryError, getattr(torch, "OutOfMemoryError", MemoryError))):
        return True
    return any(k in str(exc).lower() for k in OOM_WORDS)


def measure_case(spec: dict) -> dict:
    """Time and measure one provider on one problem size; never raises."""
    device, provider = spec["device"], spec["provider"]
    n, v, dtype = spec["N"], spec["V"], DTYPES[spec["dtype"]]
    out = {k: spec[k] for k in ("case", "label", "N", "V", "dtype", "provider")}
    out["status"] = "ok"
    start = time.perf_counter()
    s = t = y = None
    try:
        P.configure(spec.get("divergence", "kl"), spec.get("beta", 0.5))
        fn = P.make(provider, device)
        gen = torch.Generator(device=device).manual_seed(1234)
        s = (2 * torch.randn(n, v, generator=gen, device=device)).to(dtype).requires_grad_(True)
        t = (2 * torch.randn(n, v, generator=gen, device=device)).to(dtype)
        y = torch.randint(0, v, (n,), generator=gen, device=device)

        def fwd():
            with torch.no_grad():
                fn(s, t, y)

        def fwdbwd():
            fn(s, t, y).backward()

        def clear_grad():
            s.grad = None

        knobs = dict(
            device=device,
            warmup=spec["warmup"],
            target_s=spec["target_s"],
            min_reps=spec["min_reps"],
            max_reps=spec["max_reps"],
        )
        out["fwd"] = time_call(fwd, clear_grad, **knobs)
        out["fwdbwd"] = time_call(fwdbwd, clear_grad, **knobs)
        out["fwd_peak_mib"] = peak_extra_mib(fwd, clear_grad, device)
        out["fwdbwd_peak_mib"] = peak_extra_mib(fwdbwd, clear_grad, device)
        if spec.get("check", True):
            with torch.no_grad():
                loss = float(fn(s, t, y).float())
            ref = P.reference_loss(s.detach(), t, y)
            rel = abs(loss - ref) / max(abs(ref), 1e-12)
            out.update(loss=loss, ref_loss=ref, rel_err=rel)
            tol = 1e-4 if dtype == torch.float32 else 3e-2
            if not rel <= tol:  # also catches NaN
                out["status"] = f"mismatch (rel err {rel:.1e} > {tol:.0e})"
    except P.Unavailable as exc:
        out["status"] = f"unavailable: {exc}"
    except BaseException as exc:  # noqa: BLE001 - report every failure as a result
        if _is_oom(exc):
            out["status"] = "oom"
        else:
            out["status"] = f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            out["traceback"] = traceback.format_exc(limit=4)
    finally:
        s = t = y = None
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    out["threads"] = torch.get_num_threads()
    out["wall_s"] = round(time.perf_counter() - start, 2)  # this measurement, compile included
    return out


def copy_bandwidth(device: str) -> dict:
    """Measured copy bandwidth, ``dst.copy_(src)`` of a large buffer: bytes read + written / s."""
    numel = (256 << 20) if device == "cuda" else (64 << 20)
    src = torch.ones(numel, device=device)
    dst = torch.empty_like(src)
    r = time_call(
        lambda: dst.copy_(src),
        lambda: None,
        device,
        warmup=3,
        target_s=1.0,
        min_reps=10,
        max_reps=100,
    )
    nbytes = 2 * src.numel() * src.element_size()
    return {
        "copy_gbps": nbytes / (r["median_ms"] / 1e3) / 1e9,
        "copy_bytes": nbytes,
        "copy_ms": r["median_ms"],
    }


def environment(device: str) -> dict:
    """What the worker sees: threads, device name, versions, memory method."""
    info = {
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
    }
    if device == "cuda":
        info["device_name"] = torch.cuda.get_device_name()
        info["memory_method"] = "torch.cuda.max_memory_allocated"
    else:
        info["memory_method"] = (
            "process peak RSS (VmHWM reset via clear_refs) minus RSS after inputs"
            if cpu_memory_method() == "rss"
            else "unavailable on this OS"
        )
    try:
        import kdfused

        info["kdfused"] = getattr(kdfused, "__version__", "unknown")
    except Exception as exc:  # noqa: BLE001
        info["kdfused"] = f"not importable: {exc}"
    return info


def main(specs: list[dict]) -> None:
    """Run each spec in turn, printing one ``@@RESULT`` line per spec."""
    if specs and specs[0]["device"] == "cpu" and sys.platform.startswith("linux"):
        limit_cpu_memory()
    if specs and specs[0].get("threads"):
        torch.set_num_threads(specs[0]["threads"])
    for spec in specs:
        if spec.get("provider") == "_copy":
            res = copy_bandwidth(spec["device"])
            res.update(environment(spec["device"]))
        else:
            res = measure_case(spec)
        print("@@RESULT " + json.dumps(res), flush=True)
    os._exit(0)  # skip slow interpreter teardown (compiled-code caches, CUDA context)
