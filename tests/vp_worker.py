"""One process of a vocabulary-parallel test group (tests/test_vocab_parallel.py starts them).

    python tests/vp_worker.py RANK WORLD STORE_FILE OUT_JSON SEED [CASE ...]

Every process builds the same whole inputs from SEED, keeps its slice of the vocabulary, runs
each case and writes {case: null | "failure message"} to OUT_JSON. A case passes when, on every
process, the loss equals the single-process kdfused loss on the whole rows (and the float64
reference), the gradient slices equal the slices of the whole gradients, and the loss is bitwise
the same on every process. Every collective is under the group's timeout (a bug fails, never
hangs).
"""

from __future__ import annotations

import datetime
import json
import os
import sys
import traceback

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import kdfused  # noqa: E402
from kdfused import reference  # noqa: E402

DIVERGENCES = ["kl", "ce", "reverse_kl", "jsd", "tvd"]
REDUCTIONS = ["batchmean", "mean", "sum", "none"]
TOL = {torch.float32: dict(rtol=2e-5, atol=2e-6), torch.float64: dict(rtol=1e-10, atol=1e-12)}


def widths(world: int, V: int) -> list[int]:
    # Uneven on purpose: rank k gets a different width, every rank at least one column.
    w = [max(1, (V * (k + 1)) // (world * (world + 1) // 2)) for k in range(world)]
    w[-1] = V - sum(w[:-1])
    return w


def case_table() -> dict:
    cases = {}
    for div in DIVERGENCES:
        for red in REDUCTIONS:
            cases[f"{div}-{red}-f64"] = dict(div=div, red=red, dtype=torch.float64)
        cases[f"{div}-batchmean-f32"] = dict(div=div, red="batchmean", dtype=torch.float32)
        cases[f"{div}-teacher-grad"] = dict(div=div, red="mean", dtype=torch.float64, gt=True)
        cases[f"{div}-masked-one-rank"] = dict(div=div, red="sum", dtype=torch.float64, mask=True)
        cases[f"{div}-soft-only"] = dict(div=div, red="batchmean", dtype=torch.float64, hw=0.0)
        cases[f"{div}-grad-output"] = dict(div=div, red="none", dtype=torch.float64, gout=True)
    cases["jsd-beta-0.2-f32"] = dict(div="jsd", red="mean", dtype=torch.float32, beta=0.2)
    cases["jsd-beta-1"] = dict(div="jsd", red="mean", dtype=torch.float64, beta=1.0)
    cases["hard-only"] = dict(div="kl", red="mean", dtype=torch.float64, sw=0.0)
    cases["bf16-student-f32-teacher"] = dict(
        div="kl", red="batchmean", dtype=torch.float32, sdtype=torch.bfloat16
    )
    cases["module"] = dict(div="kl", red="batchmean", dtype=torch.float64, module=True)
    cases["reference-parallel"] = dict(div="jsd", red="sum", dtype=torch.float64, ref=True)
    for div in DIVERGENCES:
        cases[f"linear-{div}-mean-f64"] = dict(div=div, red="mean", dtype=torch.float64, linear=1)
    cases["linear-kl-none-f64"] = dict(div="kl", red="none", dtype=torch.float64, linear=1)
    cases["linear-jsd-sum-f32"] = dict(div="jsd", red="sum", dtype=torch.float32, linear=1)
    cases["linear-tvd-teacher-logits"] = dict(
        div="tvd", red="batchmean", dtype=torch.float64, linear=1, tlogits=True
    )
    cases["linear-kl-auto-chunk"] = dict(
        div="kl", red="mean", dtype=torch.float32, linear=1, chunk=None
    )
    # The logit transform (both sides, softcapped; tf) and the student's entropy (ent).
    cases["transform-kl-entropy"] = dict(
        div="kl", red="batchmean", dtype=torch.float64, tf=1, ent=1
    )
    cases["transform-jsd-teacher-grad"] = dict(
        div="jsd", red="mean", dtype=torch.float64, tf=1, gt=1
    )
    cases["transform-tvd-f32-entropy"] = dict(
        div="tvd", red="sum", dtype=torch.float32, tf=1, ent=1
    )
    cases["linear-transform-jsd-entropy"] = dict(
        div="jsd", red="mean", dtype=torch.float64, linear=1, tf=1, ent=1
    )
    return cases


# The transform of the "tf" cases: a negative scale and a softcap on the student, a scale and a
# softcap on the teacher (the logits reach the tanh's curved part).
TRANSFORM = dict(
    student_logit_scale=-1.3, teacher_logit_scale=0.8, student_softcap=4.0, teacher_softcap=3.0
)


def run_linear_case(name: str, c: dict, rank: int, world: int, gen: torch.Generator) -> None:
    N, H, Ht, V = 11, 6, 5, 41
    dtype = c["dtype"]

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)

    h, W, b = rnd(N, H), rnd(V, H), rnd(V)
    th, tW, tb = rnd(N, Ht), rnd(V, Ht) * 2, rnd(V)
    tl_all = rnd(N, V) * 3
    w = widths(world, V)
    lo = sum(w[:rank])
    hi = lo + w[rank]
    y = torch.tensor([(sum(w[: k % world]) + 3 * k) % V for k in range(N)], dtype=torch.int64)
    y[0:4] = -100  # with chunk_size 4: a whole chunk ignored (no GEMM, no collective)
    y[6] = -100
    opts = dict(
        temperature=2.0,
        soft_weight=0.6,
        hard_weight=0.4,
        divergence=c["div"],
        reduction=c["red"],
        chunk_size=c.get("chunk", 4),
        **(TRANSFORM if c.get("tf") else {}),
    )
    ent = bool(c.get("ent"))

    def run(Wt, bt, tWt, tbt, tlt, **kw):
        hh = h.clone().requires_grad_(True)
        Wg = Wt.clone().requires_grad_(True)
        bg = bt.clone().requires_grad_(True)
        if c.get("tlogits"):
            loss = kdfused.linear_kd_loss(
                hh, Wg, labels=y, student_bias=bg, teacher_logits=tlt, **opts, **kw
            )
        else:
            loss = kdfused.linear_kd_loss(
                hh, Wg, th, tWt, y, student_bias=bg, teacher_bias=tbt, **opts, **kw
            )
        if ent:
            loss, H = loss
            assert H.grad_fn is None and H.shape == (N,)
            entropies.append(H)
        g = torch.linspace(0.5, 2.0, loss.numel(), dtype=loss.dtype).reshape(loss.shape)
        (loss * g).sum().backward()
        return loss.detach(), hh.grad, Wg.grad, bg.grad

    grp = dist.group.WORLD
    entropies = []
    kw_ent = dict(return_entropy=True) if ent else {}
    loss, gh, gW, gb = run(
        W[lo:hi], b[lo:hi], tW[lo:hi], tb[lo:hi], tl_all[:, lo:hi].contiguous(), process_group=grp,
        **kw_ent,
    )  # fmt: skip
    wl, wgh, wgW, wgb = run(W, b, tW, tb, tl_all, **kw_ent)
    tol = TOL[dtype]
    if ent:
        torch.testing.assert_close(entropies[0], entropies[1], **tol, msg=lambda m: f"entropy: {m}")
        assert (entropies[0][y == -100] == 0).all()
    torch.testing.assert_close(loss, wl, **tol, msg=lambda m: f"loss vs single-process: {m}")
    torch.testing.assert_close(gh, wgh, **tol, msg=lambda m: f"grad_hidden: {m}")
    torch.testing.assert_close(gW, wgW[lo:hi], **tol, msg=lambda m: f"grad_weight slice: {m}")
    torch.testing.assert_close(gb, wgb[lo:hi], **tol, msg=lambda m: f"grad_bias slice: {m}")
    for x, what in ((loss, "loss"), (gh, "grad_hidden")):
        bits = x.reshape(-1).to(torch.float64).view(torch.int64)
        allbits = [torch.empty_like(bits) for _ in range(world)]
        dist.all_gather(allbits, bits)
        if not all(torch.equal(b_, allbits[0]) for b_ in allbits):
            raise AssertionError(f"{what} differs across ranks")


def run_case(name: str, c: dict, rank: int, world: int, gen: torch.Generator) -> None:
    N, V = 7, 41
    dtype = c["dtype"]
    sdtype = c.get("sdtype", dtype)
    s_all = (torch.randn(N, V, generator=gen, dtype=torch.float64) * 3).to(sdtype)
    t_all = (torch.randn(N, V, generator=gen, dtype=torch.float64) * 3).to(dtype)
    w = widths(world, V)
    lo = sum(w[:rank])
    hi = lo + w[rank]
    # Labels in every rank's slice, and one ignored row.
    y = torch.tensor([(sum(w[: k % world]) + k) % V for k in range(N)], dtype=torch.int64)
    y[3] = -100
    if c.get("mask"):
        # Columns masked on the last rank's slice only, in both inputs; row 1 masked over that
        # whole slice (that rank's statistics are empty for row 1), except the label's column is
        # elsewhere.
        last = sum(w[:-1])
        s_all[:, last : last + 2] = float("-inf")
        t_all[:, last : last + 2] = float("-inf")
        s_all[1, last:] = float("-inf")
        t_all[1, last:] = float("-inf")
        y[y >= last] = 0
    T = 2.0 if c["div"] != "tvd" else 1.5
    opts = dict(
        temperature=T,
        soft_weight=c.get("sw", 0.7),
        hard_weight=c.get("hw", 0.3),
        divergence=c["div"],
        beta=c.get("beta", 0.5),
        reduction=c["red"],
        **(TRANSFORM if c.get("tf") else {}),
    )
    ent = bool(c.get("ent"))
    entropies = []
    labels = y if opts["hard_weight"] > 0 else None
    want_gt = bool(c.get("gt"))

    def run(fn, s, t, **kw):
        s = s.clone().requires_grad_(True)
        t = t.clone().requires_grad_(want_gt)
        loss = fn(s, t, labels, **opts, **kw, **({"return_entropy": True} if ent else {}))
        if ent:
            loss, H = loss
            assert H.grad_fn is None and H.shape == (N,)
            entropies.append(H.to(torch.float64))
        g = torch.linspace(0.5, 2.0, loss.numel(), dtype=loss.dtype).reshape(loss.shape)
        if c.get("gout"):
            (loss * g).sum().backward()
        elif loss.dim():
            loss.sum().backward()
        else:
            loss.backward()
        return loss.detach(), s.grad, t.grad

    group = dist.group.WORLD
    s_loc, t_loc = s_all[:, lo:hi].contiguous(), t_all[:, lo:hi].contiguous()
    if c.get("module"):
        crit = kdfused.KDLoss(**opts, process_group=group)

        def par(s, t, y, **o):
            return crit(s, t, y)

        loss, gs, gt = run(par, s_loc, t_loc)
    elif c.get("ref"):
        loss, gs, gt = run(reference.kd_loss, s_loc, t_loc, process_group=group)
    else:
        loss, gs, gt = run(kdfused.kd_loss, s_loc, t_loc, process_group=group)
    whole, wgs, wgt = run(kdfused.kd_loss, s_all, t_all)
    ref, rgs, rgt = run(reference.kd_loss, s_all.to(torch.float64), t_all.to(torch.float64))
    tol = TOL[dtype]
    if ent:  # (parallel, single-process, float64 reference)
        for other, what in ((entropies[1], "single-process"), (entropies[2], "reference")):
            torch.testing.assert_close(
                entropies[0], other, **tol, msg=lambda m, w=what: f"entropy vs {w}: {m}"
            )
        assert labels is None or (entropies[0][labels == -100] == 0).all()
    torch.testing.assert_close(loss, whole, **tol, msg=lambda m: f"loss vs single-process: {m}")
    torch.testing.assert_close(
        loss.to(torch.float64), ref, **tol, msg=lambda m: f"loss vs float64 reference: {m}"
    )
    gtol = tol if sdtype == dtype else dict(rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(
        gs, wgs[:, lo:hi], **gtol, msg=lambda m: f"student grad vs single-process: {m}"
    )
    torch.testing.assert_close(
        gs.to(torch.float64),
        rgs[:, lo:hi],
        **gtol,
        msg=lambda m: f"student grad vs float64 reference: {m}",
    )
    if want_gt:
        torch.testing.assert_close(
            gt, wgt[:, lo:hi], **tol, msg=lambda m: f"teacher grad vs single-process: {m}"
        )
    else:
        assert gt is None, "teacher got a gradient it did not ask for"
    # Bitwise the same loss on every process.
    bits = loss.reshape(-1).to(torch.float64).view(torch.int64)
    allbits = [torch.empty_like(bits) for _ in range(world)]
    dist.all_gather(allbits, bits)
    if not all(torch.equal(b, allbits[0]) for b in allbits):
        raise AssertionError(f"loss differs across ranks: {[b.tolist() for b in allbits]}")


def expect_raise(fn, exc, text: str) -> None:
    try:
        fn()
    except exc as e:
        if text not in str(e):
            raise AssertionError(f"expected {text!r} in the error, got: {e}") from e
        return
    raise AssertionError(f"expected {exc.__name__} ({text!r}), nothing raised")


def run_special(name: str, rank: int, world: int) -> None:
    """Bad input must raise on every process (none blocks); torch.compile does what the docs say."""
    N, V = 4, 3 * world
    g = torch.Generator().manual_seed(7)
    s = torch.randn(N, 3, generator=g, dtype=torch.float64)
    t = torch.randn(N, 3, generator=g, dtype=torch.float64)
    y = torch.arange(N) % V
    grp = dist.group.WORLD
    kw = dict(temperature=2.0, soft_weight=0.5, hard_weight=0.5, process_group=grp)
    if name == "error-label-range":
        bad = y.clone()
        bad[2] = V  # one past the whole vocabulary (but inside no slice either)
        expect_raise(lambda: kdfused.kd_loss(s, t, bad, **kw), ValueError, "whole vocabulary")
    elif name == "error-rows":
        ss, tt = (s, t) if rank != world - 1 else (s[:-1], t[:-1])
        yy = y if rank != world - 1 else y[:-1]
        expect_raise(lambda: kdfused.kd_loss(ss, tt, yy, **kw), ValueError, "same rows")
    elif name == "error-labels-differ":
        yy = y.clone()
        if rank == 0:
            yy[0] = (yy[0] + 1) % V
        expect_raise(lambda: kdfused.kd_loss(s, t, yy, **kw), ValueError, "identical")
    elif name == "error-dtype":
        ss = s.float() if rank == 0 else s
        expect_raise(lambda: kdfused.kd_loss(ss, t, y, **kw), ValueError, "dtype")
    elif name == "error-local":
        # Rank 0's teacher has the wrong width: its own check fails before any collective; it
        # still joins the metadata exchange, so the others raise instead of blocking.
        tt = t[:, :2] if rank == 0 else t
        text = "same shape" if rank == 0 else "failed their checks"
        expect_raise(lambda: kdfused.kd_loss(s, tt, y, **kw), ValueError, text)
    elif name == "error-linear-label-range":
        h = torch.randn(N, 5, generator=g, dtype=torch.float64)
        w = torch.randn(3, 5, generator=g, dtype=torch.float64)
        bad = y.clone()
        bad[1] = -5
        expect_raise(
            lambda: kdfused.linear_kd_loss(h, w, h, w, bad, **kw), ValueError, "whole vocabulary"
        )
    elif name == "compile-graph-break":
        sl = s.clone().requires_grad_(True)

        def step(a, b, lab):
            return kdfused.kd_loss(a * 1.0, b, lab, **kw) * 2.0

        eager = step(sl, t, y)
        compiled = torch.compile(step)(sl, t, y)
        torch.testing.assert_close(compiled, eager, rtol=0, atol=0)
        compiled.backward()

        # A separate function (dynamo caches per code object: `step` would reuse its graphs).
        def step_full(a, b, lab):
            return kdfused.kd_loss(a * 1.0, b, lab, **kw) * 2.0

        full = torch.compile(step_full, fullgraph=True)
        expect_raise(lambda: full(sl, t, y), Exception, "disable")
    else:
        raise KeyError(name)


def main():
    rank, world, store, out, seed = (
        int(sys.argv[1]),
        int(sys.argv[2]),
        sys.argv[3],
        sys.argv[4],
        int(sys.argv[5]),
    )
    names = sys.argv[6:]
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        # A file store, not a TCP port: a port found free by the test can be taken by another
        # process before rank 0 binds it (tests run in parallel).
        init_method=f"file://{store}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )
    table = case_table()
    results = {}
    for i, name in enumerate(names):
        gen = torch.Generator().manual_seed(seed + i)
        try:
            if name.startswith("error-") or name.startswith("compile-"):
                run_special(name, rank, world)
            elif table[name].get("linear"):
                run_linear_case(name, table[name], rank, world, gen)
            else:
                run_case(name, table[name], rank, world, gen)
            results[name] = None
        except Exception as e:  # noqa: BLE001 - reported to the test
            results[name] = f"rank {rank}: {type(e).__name__}: {e}\n{traceback.format_exc()}"
            # The others may be waiting in a collective this process left: stop here (the
            # remaining cases are reported as not run) rather than pair mismatched collectives.
            for rest in names[i + 1 :]:
                results[rest] = f"rank {rank}: not run (case {name} failed first)"
            break
    with open(out, "w") as f:
        json.dump(results, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
