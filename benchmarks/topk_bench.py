"""Benchmark of kdfused.topk_kd_loss and kdfused.linear_topk_kd_loss (distillation from a stored
top-k teacher) against the gather + log_softmax code people write, CPU or CUDA.

Forward + backward (the loss and the student's gradients) of, per (k, support):

  logits mode (the student's N x V logits are given):
    topk            kdfused.topk_kd_loss(s, idx, vals, support=..., values=...)
    eager           the code people write: log_softmax(s / T) over V, gather at the k indices,
                    then the support's step (full: nothing; renormalized: subtract the logsumexp
                    over the k; tail: append the tail bucket log(1 - sum exp), as TRL's
                    _add_tail_bucket), the teacher's log-probs likewise, sum p (log p - log q),
                    batchmean, * T^2; autograd for the gradient
    compile         the same function under torch.compile
    full_kd         kdfused.kd_loss(s, t) with the full N x V teacher (what storing top-k
                    replaces; independent of k and the support: measured once per size)
  linear mode (--linear: hidden states (N, H) and the lm-head weight (V, H) are given):
    linear_topk     kdfused.linear_topk_kd_loss(h, W, idx, vals, ...): no N x V logits
    linear_eager    F.linear(h, W), then the eager code above
    linear_compile  the same under torch.compile
    linear_full_kd  kdfused.linear_kd_loss(h, W, teacher_logits=t): the full-teacher fused loss
                    (independent of k and the support: measured once per size)

The stored teacher is the top-k of random N x V teacher logits: raw logits for support "full"
(values="logits"), log_softmax(t / T) log-probs for "renormalized" and "tail" (values="logprobs",
as TRL's server distillation stores them). Loss: the soft KL term alone, T = 2, batchmean.

    python benchmarks/topk_bench.py                      # N = 2048, V = 128256, k in {1, 8, 64,
                                                         # 128}, fp32, logits mode, 3 supports
    python benchmarks/topk_bench.py --linear             # the same with H = 2048 (linear mode)
    python benchmarks/topk_bench.py --device cuda --dtypes bf16 --linear
    python benchmarks/topk_bench.py --quick              # a smoke run (seconds)
    python benchmarks/topk_bench.py --linear --rows 4096 --hidden 1024 --vocab 32000 --ks 64 \\
        --supports full --providers linear_topk          # the linear loss's peak memory vs one
                                                         # N x V fp32 tensor (500 MiB)

Prints a table of medians, ratios and peak memory and writes
benchmarks/results/topk-{cpu,cuda}[-linear][-quick].{csv,json} (or --out STEM). Peak memory is
above the state before the call (inputs, stored teacher): on the CPU the resident-set high-water
mark (VmHWM reset through /proc/self/clear_refs, measured in a separate call after the timings;
"-" where the OS does not allow it); on CUDA torch.cuda.max_memory_allocated() minus the memory
allocated before the call.
"""

from __future__ import annotations

import argparse
import csv
import gc
import json
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import kdfused

from _procinfo import peak_rss_mib

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SUPPORTS = ("full", "renormalized", "tail")
LOGIT_PROVIDERS = ("topk", "eager", "compile", "full_kd")
LINEAR_PROVIDERS = ("linear_topk", "linear_eager", "linear_compile", "linear_full_kd")
# Independent of k and of the support: measured once per (N, V, dtype).
FULL_TEACHER = ("full_kd", "linear_full_kd")
T = 2.0
MIB = float(1 << 20)


def values_kind(support: str) -> str:
    """What the stored teacher holds: raw logits for "full", log-probs (TRL's) otherwise."""
    return "logits" if support == "full" else "logprobs"


# ---- the code people write ---------------------------------------------------------------------


def _tail_bucket(logp):
    # TRL's _add_tail_bucket: a (k+1)-th entry log(1 - sum exp(logp)), the sum kept below 1.
    log_sum = torch.clamp(torch.logsumexp(logp, -1, keepdim=True), max=-1e-7)
    return torch.cat([logp, torch.log(-torch.expm1(log_sum))], -1)


def eager_topk_loss(s, idx, vals, support="full"):
    """log_softmax over V, gather at the stored indices, the support's step, KL over the
    support (T^2, batchmean)."""
    log_q = F.log_softmax(s.float() / T, dim=-1).gather(-1, idx.long())
    if values_kind(support) == "logits":
        log_p = F.log_softmax(vals.float() / T, dim=-1)
    else:
        log_p = vals.float()
    if support == "renormalized":
        log_q = log_q - torch.logsumexp(log_q, -1, keepdim=True)
        log_p = log_p - torch.logsumexp(log_p, -1, keepdim=True)
    elif support == "tail":
        log_q, log_p = _tail_bucket(log_q), _tail_bucket(log_p)
    elif values_kind(support) == "logprobs":
        log_p = log_p - torch.logsumexp(log_p, -1, keepdim=True)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean() * (T * T)


def eager_linear_topk_loss(h, w, idx, vals, support="full"):
    return eager_topk_loss(F.linear(h, w), idx, vals, support)


def _support_kwargs(support: str) -> dict:
    # Only what differs from the defaults, so that a "full" run needs nothing new of the op.
    if support == "full":
        return {}
    return dict(support=support, values=values_kind(support))


def kdfused_topk_loss(s, idx, vals, support="full"):
    return kdfused.topk_kd_loss(s, idx, vals, temperature=T, **_support_kwargs(support))


def kdfused_linear_topk_loss(h, w, idx, vals, support="full"):
    return kdfused.linear_topk_kd_loss(h, w, idx, vals, temperature=T, **_support_kwargs(support))


def kdfused_full_loss(s, t):
    return kdfused.kd_loss(s, t, temperature=T)


def kdfused_linear_full_loss(h, w, t):
    return kdfused.linear_kd_loss(h, w, teacher_logits=t, temperature=T)


# ---- measurement -------------------------------------------------------------------------------


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def peak_mib(call, device):
    """Peak memory of one call above the memory in use before it (None where unknown)."""
    if device == "cuda":
        _sync(device)
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        call()
        _sync(device)
        return (torch.cuda.max_memory_allocated() - base) / MIB
    mib = peak_rss_mib(call)
    return None if mib is None else max(0.0, mib)


def time_fwdbwd(loss_fn, leaves, args, reps, warmup, device):
    """(median s, all times, peak MiB) of loss_fn(*leaves, *args).backward()."""
    leaves = [x.detach().requires_grad_() for x in leaves]

    def call():
        for x in leaves:
            x.grad = None
        loss_fn(*leaves, *args).backward()

    for _ in range(warmup):
        call()
    times = []
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        call()
        _sync(device)
        times.append(time.perf_counter() - t0)
    for x in leaves:
        x.grad = None
    mem = peak_mib(call, device)
    for x in leaves:
        x.grad = None
    return statistics.median(times), times, mem


def make_inputs(N, V, H, dtype, device, linear, seed=0):
    """Student (logits, or hidden and weight), teacher logits; drawn on the CPU (the same values
    on every device)."""
    g = torch.Generator().manual_seed(seed)
    if linear:
        h = torch.randn(N, H, generator=g).to(dtype)
        w = (torch.randn(V, H, generator=g) * (3.0 / H**0.5)).to(dtype)
        student = (h.to(device), w.to(device))
    else:
        student = ((torch.randn(N, V, generator=g) * 2).to(dtype).to(device),)
    t = (torch.randn(N, V, generator=g) * 2).to(dtype).to(device)
    return student, t


def stored_teacher(t, k_max, support):
    """The top-k_max teacher as stored: int32 indices, logits or float32 log-probs."""
    if values_kind(support) == "logits":
        idx, vals = kdfused.topk_teacher(t, k_max)
    else:
        vals, idx = torch.topk(F.log_softmax(t.float() / T, -1), k_max, dim=-1)
    return idx.to(torch.int32), vals


# ---- the run -----------------------------------------------------------------------------------


def _providers(args):
    pool = LINEAR_PROVIDERS if args.linear else LOGIT_PROVIDERS
    chosen = [p for p in args.providers if p in pool] if args.providers else list(pool)
    if args.providers and not chosen:
        raise SystemExit(f"none of {args.providers} is a provider of this mode: {pool}")
    return chosen


def _functions(linear):
    if linear:
        return {
            "linear_topk": kdfused_linear_topk_loss,
            "linear_eager": eager_linear_topk_loss,
            "linear_compile": eager_linear_topk_loss,  # compiled per case
        }
    return {"topk": kdfused_topk_loss, "eager": eager_topk_loss, "compile": eager_topk_loss}


def _report(res, name, med, mem):
    res[f"{name}_ms"] = med * 1e3
    res[f"{name}_peak_mib"] = mem
    print(
        f"  N={res['N']} V={res['V']} k={res['k']} {res['support']} {res['dtype']} {name}: "
        f"{med * 1e3:.1f} ms (peak {mem if mem is None else round(mem)} MiB)",
        flush=True,
    )


def _check_loss(res, student, idx, vals, support, linear):
    # The fused loss against float64 eager on the first rows, before timing.
    rows = min(64, idx.shape[0])
    if linear:
        h, w = student
        s = F.linear(h[:rows].double(), w.double())
        got = kdfused_linear_topk_loss(h[:rows], w, idx[:rows], vals[:rows], support)
    else:
        s = student[0][:rows].double()
        got = kdfused_topk_loss(student[0][:rows], idx[:rows], vals[:rows], support)
    ref = eager_topk_loss(s, idx[:rows], vals[:rows].double(), support).item()
    res["loss_rel_diff_vs_fp64_eager"] = abs(got.item() - ref) / max(abs(ref), 1e-30)


def run_case(args, N, V, dname, providers):
    dtype, device, linear = DTYPES[dname], args.device, args.linear
    student, t = make_inputs(N, V, args.hidden, dtype, device, linear)
    slow_reps = args.repeat if args.quick else max(2, args.repeat - 2)
    full = None
    full_name = next((p for p in providers if p in FULL_TEACHER), None)
    if full_name:
        fn = kdfused_linear_full_loss if linear else kdfused_full_loss
        full = time_fwdbwd(fn, student, (t,), args.repeat, 1, device)
    funcs = _functions(linear)
    rows = []
    for support in args.supports:
        idx_all, vals_all = stored_teacher(t, max(args.ks), support)
        for k in args.ks:
            # Sorted top-k: the first k of the largest k are the top k.
            idx, vals = idx_all[:, :k].contiguous(), vals_all[:, :k].contiguous()
            res = {"N": N, "V": V, "H": args.hidden if linear else None, "k": k}
            res.update(support=support, values=values_kind(support), dtype=dname, device=device)
            if any(p in providers for p in ("topk", "linear_topk")):
                _check_loss(res, student, idx, vals, support, linear)
            for name in providers:
                if name in FULL_TEACHER:
                    continue
                fn = funcs[name]
                if name.endswith("compile"):
                    # A fresh compilation per case: past dynamo's recompile limit the compiled
                    # function would silently run eagerly.
                    torch._dynamo.reset()
                    fn = torch.compile(fn, dynamic=False)
                reps = slow_reps if name != "topk" and name != "linear_topk" else args.repeat
                med, _, mem = time_fwdbwd(fn, student, (idx, vals, support), reps, 1, device)
                _report(res, name, med, mem)
            if full is not None:
                res[f"{full_name}_ms"] = full[0] * 1e3
                res[f"{full_name}_peak_mib"] = full[2]
            # One N x V float32 tensor: what the fused losses must stay under.
            res["nxv_fp32_mib"] = N * V * 4 / MIB
            rows.append(res)
        del idx_all, vals_all
    del student, t
    gc.collect()
    return rows


def run(args):
    providers = _providers(args)
    torch.manual_seed(0)
    rows = []
    for V in args.vocab:
        for dname in args.dtypes:
            rows += run_case(args, args.rows, V, dname, providers)
    return rows


def fmt(x, nd=1):
    return "-" if x is None else f"{x:.{nd}f}"


def table(rows, linear):
    fused, full = ("linear_topk", "linear_full_kd") if linear else ("topk", "full_kd")
    peers = ("linear_eager", "linear_compile") if linear else ("eager", "compile")
    head = (
        f"| N x V, k, support, dtype | {fused} | {peers[0]} | {peers[1]} | {full} | "
        f"{peers[1]} / {fused} | {fused} / {full} | peak MiB {fused} / {peers[0]} / "
        f"{peers[1]} / {full} (N x V fp32) |"
    )
    lines = [head, "|" + "---|" * 8]
    for r in rows:
        f_ms, c_ms, full_ms = r.get(f"{fused}_ms"), r.get(f"{peers[1]}_ms"), r.get(f"{full}_ms")
        ratio_c = c_ms / f_ms if c_ms and f_ms else None
        ratio_f = f_ms / full_ms if f_ms and full_ms else None
        mems = " / ".join(fmt(r.get(f"{p}_peak_mib"), 0) for p in (fused, *peers, full))
        lines.append(
            f"| {r['N']} x {r['V']}, k={r['k']}, {r['support']}, {r['dtype']} | {fmt(f_ms)} ms | "
            f"{fmt(r.get(f'{peers[0]}_ms'))} ms | {fmt(c_ms)} ms | {fmt(full_ms)} ms | "
            f"{fmt(ratio_c, 2)}x | {fmt(ratio_f, 2)}x | {mems} ({fmt(r['nxv_fp32_mib'], 0)}) |"
        )
    return "\n".join(lines)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="small sizes (a smoke run: seconds)")
    ap.add_argument("--linear", action="store_true", help="hidden states + lm head (linear mode)")
    ap.add_argument("--rows", "--n", dest="rows", type=int, default=None, help="N (2048)")
    ap.add_argument("--vocab", type=int, nargs="+", default=None, help="V (128256)")
    ap.add_argument("--hidden", type=int, default=None, help="H, linear mode (2048)")
    ap.add_argument("--ks", "--k", dest="ks", type=int, nargs="+", default=None)
    ap.add_argument("--supports", nargs="+", default=list(SUPPORTS), choices=SUPPORTS)
    ap.add_argument("--dtypes", nargs="+", default=["fp32"], choices=list(DTYPES))
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument(
        "--providers",
        nargs="+",
        default=None,
        choices=LOGIT_PROVIDERS + LINEAR_PROVIDERS,
        help="default: every provider of the mode",
    )
    ap.add_argument(
        "--repeat", "--reps", dest="repeat", type=int, default=0, help="timed runs (5; quick 2)"
    )
    ap.add_argument("--out", default=None, help="output stem (default benchmarks/results/...)")
    args = ap.parse_args(argv)
    # --quick: small defaults; explicit flags still win.
    quick = dict(rows=64, vocab=[2000], hidden=64, ks=[1, 8], repeat=2)
    full = dict(rows=2048, vocab=[128256], hidden=2048, ks=[1, 8, 64, 128], repeat=5)
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) in (None, 0):
            setattr(args, key, value)
    return args


def default_stem(args) -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    name = f"topk-{args.device}" + ("-linear" if args.linear else "") + ("-quick" * args.quick)
    return os.path.join(here, "results", name)


def write(stem, env, rows):
    os.makedirs(os.path.dirname(os.path.abspath(stem)), exist_ok=True)
    with open(stem + ".json", "w") as f:
        json.dump({"environment": env, "results": rows}, f, indent=1)
    first = ("N", "V", "H", "k", "support", "values", "dtype", "device")
    seen = {k for r in rows for k in r}
    keys = [k for k in first if k in seen] + sorted(seen - set(first))
    with open(stem + ".csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


def main(argv=None):
    args = parse_args(argv)
    stem = args.out or default_stem(args)
    env = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "kdfused": kdfused.build_info(),
        "temperature": T,
        "command": "python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:]),
    }
    if args.device == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
    print(f"topk benchmark: {env}", flush=True)
    rows = run(args)
    print()
    print(table(rows, args.linear))
    write(stem, env, rows)
    print(f"\nwrote {stem}.csv and {stem}.json")
    return rows


if __name__ == "__main__":
    main()
