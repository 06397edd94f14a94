"""Cases, float64 expected values and tolerances for ``python -m kdfused.selftest``.

The expected values are computed here in plain float64 PyTorch with autograd, from the *given*
(already rounded) inputs, so that a correct kernel can differ from them only by its own
accumulation error and the rounding of its outputs. Per row, with p = softmax(t/T) (teacher),
q = softmax(s/T) (student), sums over the columns where the distributions have mass:

    kl          KL(p||q) = sum p (log p - log q)
    ce          -sum p log q
    reverse_kl  KL(q||p) = sum q (log q - log p)
    jsd         beta KL(p||m) + (1 - beta) KL(q||m),  m = beta p + (1 - beta) q, for 0 < beta < 1;
                KL(p||q) at beta = 0 and KL(q||p) at beta = 1
    tvd         0.5 sum |p - q|
    row loss    soft_weight * T^2 * D  +  hard_weight * (logsumexp(s) - s[label])

where s and t are the logits after the case's transform, if any (z = scale x, then
z = softcap tanh(z / softcap); kdfused.reference.logit_transform), differentiated through.

Tolerances (an output element passes when |got - expected| <= tol; the self-test reports the
largest |got - expected| / tol, so 1.0 is the limit):

    tol = rtol_out[out dtype] * |expected| + tol_acc(V, acc) * scale + floor[out dtype, acc]

    rtol_out   3 half-ulps relative of the output dtype (a gradient is rounded twice when
               grad_output != 1, plus margin): 3 * 2^-8 bfloat16, 3 * 2^-11 float16,
               3 * 2^-24 float32, 3 * 2^-53 float64
    tol_acc    16 eps_acc (4 + sqrt(V)): accumulation over a row of length V in float32 (float64
               when either input is float64)
    scale      loss: soft_weight T^2 sum (p + q)(|log p| + |log q| + 1) + hard_weight (|LSE(s)| +
               |s_y|), reduced like the loss (the size of the terms a kernel adds and cancels);
               gradients: per row, max(largest |expected| of the row, (soft_weight T +
               hard_weight) |grad_output| / n_valid)
    floor      2^-24 for float16 outputs (subnormal spacing), 2^-100 for a float32 accumulator
               (exp() underflow and flush-to-zero), 2^-1000 for float64

The fused linear op's paths have tolerances of their own (LIN_RTOL, below: its logits carry the
GEMMs' rounding).

Top-k (kdfused.topk_kd_loss, the ``topk`` paths): the expected values are those of
kdfused.reference.topk_kd_loss, run in float64 with autograd on the given inputs (the stored
values read exactly in float64), for the loss and the student's gradient (no teacher gradient).
The tolerance is the formula above, over the top-k buckets b (the valid stored entries, and the
tail bucket t for support="tail") instead of the V columns:

    acc        float64 when the student or the stored values are float64, else float32
    tol_acc    tol_acc(V, acc): the student's softmax runs over the whole row
    scale      loss: soft_weight T^2 sum_b (p_b + q_b)(|log p_b| + |log q_b| + 1) + hard_weight
               (|LSE(z)| + |z_y|), z the student's logits after its transform; a row with no
               valid entry has only the hard part; for "tail" the tail bucket's term adds
               (p_t + q_t)(P / (1 - P) + Q / (1 - Q)), P and Q the stored entries' mass on each
               side (log(1 - Q) from a Q with a small relative error: that error over 1 - Q);
               gradients: per row as above
    rtol_out, floor   as above

The tail cases keep k <= V / 3, so that 1 - Q is far from the clamp at exp(-1e-7) (where the
gradient through the tail switches off: a float32 kernel and the float64 reference could land
on either side).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F

from . import _reference_topk
from ._checks import (  # noqa: F401  (DIVERGENCES, REDUCTIONS: the self-test's choices)
    DIVERGENCES,
    REDUCTIONS,
    SUPPORTS,
    TOPK_DIVERGENCES,
    VALUE_KINDS,
)
from .reference import logit_transform

F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
DTYPE_NAMES = {F16: "f16", BF16: "bf16", F32: "f32", F64: "f64"}
HALF = (F16, BF16)
RTOL_OUT = {BF16: 3 * 2.0**-8, F16: 3 * 2.0**-11, F32: 3 * 2.0**-24, F64: 3 * 2.0**-53}
FLOOR_OUT = {F16: 2.0**-24, BF16: 0.0, F32: 0.0, F64: 0.0}
FLOOR_ACC = {F32: 2.0**-100, F64: 2.0**-1000}
PAIRS = [
    (F32, F32),
    (BF16, BF16),
    (F16, F16),
    (F64, F64),
    (BF16, F32),
    (F32, BF16),
    (F16, F32),
    (F16, BF16),
    (BF16, F64),
]
V_CORE = [1, 2, 7, 100, 1000, 2049, 4099, 5001, 8191, 33, 640]
# The logit transforms the cases cycle through (student scale, teacher scale, student softcap,
# teacher softcap): none, a Gemma-2-like softcap of 30 on both sides, Cohere / Granite-like
# scales alone, and scales of both signs with softcaps the logits reach the curve of.
TRANSFORMS = [
    (1.0, 1.0, None, None),
    (1.0, 1.0, 30.0, 30.0),
    (0.25, 4.0, None, None),
    (-1.3, 0.7, 3.0, 2.0),
]
TRANSFORM_NAMES = (
    "student_logit_scale",
    "teacher_logit_scale",
    "student_softcap",
    "teacher_softcap",
)
BIG = [  # (V, N, student dtype, teacher dtype) of the one large-vocabulary case per divergence
    (128256, 3, BF16, BF16),
    (32000, 4, F32, F32),
    (256000, 2, BF16, F32),
    (65537, 3, F16, F16),
    (151936, 2, F32, BF16),
]


@dataclass
class Case:
    idx: int
    divergence: str
    sdt: torch.dtype
    tdt: torch.dtype
    lead: tuple
    V: int
    reduction: str
    temperature: float = 2.0
    soft_weight: float = 1.0
    hard_weight: float = 0.0
    beta: float = 0.5
    labels: bool = True  # labels passed (rows with ignore_index are ignored)
    ignore: str = "some"  # "none", "some" or "all" rows ignored
    ignore_index: int = -100
    masked: bool = True  # -inf in both at shared columns of some rows
    strided: bool = False  # row-strided views of wider tensors
    teacher_grad: bool = False
    grad_output: str = "random"  # "one" or "random"
    loss_only: bool = False  # under torch.no_grad()
    big: bool = False
    transform: tuple = TRANSFORMS[0]  # (student scale, teacher scale, student / teacher softcap)
    tags: list = field(default_factory=list)

    def describe(self) -> str:
        dims = "x".join(str(d) for d in self.lead) + f"x{self.V}"
        flags = (
            (_transform_text(self.transform), self.transform != TRANSFORMS[0]),
            ("strided", self.strided),
            ("masked", self.masked),
            (f"ignored:{self.ignore}", self.labels and self.ignore != "none"),
            ("no-labels", not self.labels),
            ("teacher-grad", self.teacher_grad),
            ("grad_output=1", self.grad_output == "one"),
            ("no_grad", self.loss_only),
        )
        return _describe(self, f"#{self.idx}", dims, [f"T={self.temperature}"], flags)


def _transform_text(tf) -> str:
    """e.g. "z:s_scale=-1.3,t_scale=0.7,s_softcap=3.0,t_softcap=2.0" (the non-identity parts)."""
    short = ("s_scale", "t_scale", "s_softcap", "t_softcap")
    return "z:" + ",".join(f"{n}={v}" for n, v in zip(short, tf) if v not in (1.0, None))


def transform_options(case) -> dict:
    """The case's logit transform as keywords of the functions under test."""
    return dict(zip(TRANSFORM_NAMES, case.transform))


def _transformed(x: torch.Tensor, case, side: int) -> torch.Tensor:
    """Side 0 (student) or 1 (teacher) of the case's transform applied to float64 logits."""
    return logit_transform(x, case.transform[side], case.transform[2 + side])


def _describe(case, head: str, dims: str, middle: list, flags) -> str:
    """A case in one line: ``head``, the divergence, dtypes, ``dims``, the reduction, ``middle``,
    the weights, then the names of the ``flags`` ((name, on) pairs) that are on."""
    parts = [
        head,
        case.divergence + (f"(beta={case.beta})" if case.divergence == "jsd" else ""),
        f"{DTYPE_NAMES[case.sdt]}x{DTYPE_NAMES[case.tdt]}",
        dims,
        case.reduction,
        *middle,
        f"w={case.soft_weight}/{case.hard_weight}",
    ]
    return " ".join(parts + [x for x, on in flags if on])


def make_cases(divergences, quick: bool = False) -> list:
    """Every divergence x every dtype pair with cycling options, then the large-V cases."""
    cases = []
    betas = [0.5, 0.0, 1.0, 0.3]
    for div in divergences:
        for pi, (sdt, tdt) in enumerate(PAIRS):
            i = len(cases)
            V = V_CORE[i % len(V_CORE)]
            N = 2 + (i * 5) % 13
            lead = (2, (N + 1) // 2) if i % 5 == 4 else (N,)
            hw = [0.0, 0.3, 0.5][i % 3]
            c = Case(
                i,
                div,
                sdt,
                tdt,
                lead,
                V,
                REDUCTIONS[i % 4],
                temperature=[1.0, 2.0, 0.5, 4.0][(i // 2) % 4],
                soft_weight=0.7,
                hard_weight=hw,
                beta=betas[pi % 4],
                labels=hw > 0 or i % 2 == 1,
                ignore="none" if i % 4 == 1 else "some",
                ignore_index=[-100, -1][i % 2],
                masked=V >= 4 and i % 3 != 2,
                strided=(sdt in HALF or tdt in HALF) and i % 3 != 1 or i % 7 == 0,
                teacher_grad=i % 2 == 1,
                grad_output="one" if i % 3 == 0 else "random",
                loss_only=i % 7 == 3,
                transform=TRANSFORMS[(i // 2) % len(TRANSFORMS)],
            )
            if i % 11 == 5:  # the hard term alone
                c.soft_weight, c.hard_weight, c.labels = 0.0, 1.0, True
            cases.append(c)
    if quick:
        cases = [c for c in cases if c.idx % 3 == 0]
    n0 = len(cases) and cases[-1].idx + 1
    for di, div in enumerate(divergences):
        V, N, sdt, tdt = BIG[di % len(BIG)]
        if quick and V not in (128256, 256000):
            continue
        cases.append(
            Case(
                n0 + di,
                div,
                sdt,
                tdt,
                (N,),
                V,
                REDUCTIONS[di % 4],
                temperature=2.0,
                soft_weight=0.5,
                hard_weight=0.5,
                beta=0.25,
                strided=sdt in HALF,
                teacher_grad=di % 2 == 0,
                grad_output="random",
                big=True,
            )
        )
    n0 += len(divergences)
    if not quick:
        d0 = divergences[0]
        cases += [  # many rows (grid-stride loops); every row ignored; loss only at large V
            Case(
                n0,
                d0,
                BF16,
                BF16,
                (300,),
                3000,
                "mean",
                hard_weight=0.2,
                strided=True,
                teacher_grad=True,
            ),
            Case(
                n0 + 1, divergences[-1], F32, F32, (4,), 5000, "mean", hard_weight=0.5, ignore="all"
            ),
            Case(
                n0 + 2,
                d0,
                BF16,
                BF16,
                (4,),
                128256,
                "sum",
                hard_weight=0.5,
                strided=True,
                loss_only=True,
                big=True,
            ),
        ]
    return cases


def make_inputs(case: Case, seed: int) -> dict:
    """CPU inputs of a case: 'base_s'/'base_t' (wider tensors when strided), 'view' (the slice
    to take of them on the device), labels, grad_output. Replayable from (seed, case.idx)."""
    g = torch.Generator().manual_seed(seed * 1000003 + case.idx)
    R, V = math.prod(case.lead), case.V
    pad_s, pad_t, off_t = (7, 3, 1) if case.strided else (0, 0, 0)
    s = (3 * torch.randn(R, V + pad_s, generator=g, dtype=F64)).to(case.sdt)
    t = (3 * torch.randn(R, V + pad_t, generator=g, dtype=F64)).to(case.tdt)
    y = torch.randint(0, V, (R,), generator=g)
    if case.masked and V >= 4:  # shared -inf columns in every third row, never at the label
        cols = torch.randperm(V, generator=g)[: V // 4]
        for r in range(0, R, 3):
            keep = cols[cols != y[r]]
            s[r, keep] = float("-inf")
            t[r, keep + off_t] = float("-inf")
    if case.labels and case.ignore == "some":
        y[1::3] = case.ignore_index
    elif case.labels and case.ignore == "all":
        y[:] = case.ignore_index
    if case.reduction == "none":
        go = torch.rand(R, generator=g, dtype=F64) + 0.5
        if case.grad_output == "one":
            go = torch.ones(R, dtype=F64)
    else:
        go = torch.tensor(1.0 if case.grad_output == "one" else 1.75, dtype=F64)
    return {
        "s": s,
        "t": t,
        "ss": (0, V),
        "ts": (off_t, off_t + V),
        "y": y.reshape(case.lead) if case.labels else None,
        "go": go.reshape(case.lead) if case.reduction == "none" else go,
    }


def on_device(inp: dict, case: Case, device: str):
    """(student, teacher, labels, grad_output) on the device, the views taken there."""
    s = inp["s"].to(device)[:, inp["ss"][0] : inp["ss"][1]]
    t = inp["t"].to(device)[:, inp["ts"][0] : inp["ts"][1]]
    if case.strided and (s.is_contiguous() or t.is_contiguous()):
        raise AssertionError(f"case {case.idx}: the strided inputs came out contiguous")
    if len(case.lead) > 1:  # rows viewed as (B, L), keeping the row stride
        s, t = s.unflatten(0, case.lead), t.unflatten(0, case.lead)
    y = inp["y"].to(device) if inp["y"] is not None else None
    go = inp["go"].to(device)
    return s, t, y, go


def _divergence(div, lp, lq, p, q, beta):
    if div == "kl":
        return (p * (lp - lq)).sum(-1)
    if div == "ce":
        return -(p * lq).sum(-1)
    if div == "reverse_kl":
        return (q * (lq - lp)).sum(-1)
    if div == "jsd" and beta == 0:  # the end points are the limits of JSD / beta, JSD / (1-beta)
        return _divergence("kl", lp, lq, p, q, beta)
    if div == "jsd" and beta == 1:
        return _divergence("reverse_kl", lp, lq, p, q, beta)
    if div == "jsd":
        m = beta * p + (1 - beta) * q
        lm = torch.log(torch.where(m > 0, m, torch.ones_like(m)))
        return beta * (p * (lp - lm)).sum(-1) + (1 - beta) * (q * (lq - lm)).sum(-1)
    if div == "tvd":
        return 0.5 * (p - q).abs().sum(-1)
    raise ValueError(f"unknown divergence {div!r}")


def expected(case: Case, inp: dict) -> dict:
    """float64 loss, gradients and the tolerance of every output element (CPU tensors)."""
    V = case.V
    s = inp["s"][:, inp["ss"][0] : inp["ss"][1]].to(F64).requires_grad_(not case.loss_only)
    t = inp["t"][:, inp["ts"][0] : inp["ts"][1]].to(F64).requires_grad_(not case.loss_only)
    T, sw, hw = case.temperature, case.soft_weight, case.hard_weight
    R = s.shape[0]
    y = inp["y"].reshape(-1) if inp["y"] is not None else None
    valid = (y != case.ignore_index) if y is not None else torch.ones(R, dtype=torch.bool)
    zero = torch.zeros(R, dtype=F64)
    row, scale = zero.clone(), zero.clone()
    with torch.set_grad_enabled(not case.loss_only):
        mask = torch.isinf(t)  # the masked columns (-inf in both)
        leaves = (s, t)  # (the gradients are w.r.t. the raw logits)
        s, t = _transformed(s, case, 0), _transformed(t, case, 1)
        if sw != 0:
            lq = torch.where(mask, 0.0, F.log_softmax(s / T, -1))
            lp = torch.where(mask, 0.0, F.log_softmax(t / T, -1))
            p = torch.where(mask, 0.0, lp.exp())
            q = torch.where(mask, 0.0, lq.exp())
            row = row + sw * T * T * _divergence(case.divergence, lp, lq, p, q, case.beta)
            scale = scale + sw * T * T * ((p + q) * (lp.abs() + lq.abs() + 1)).sum(-1).detach()
        if hw != 0:
            yy = torch.where(valid, y, 0)
            lse = torch.logsumexp(s, -1)
            sy = s.gather(1, yy[:, None])[:, 0]
            row = row + hw * (lse - sy)
            scale = scale + hw * (lse.abs() + sy.abs()).detach()
        row = torch.where(valid, row, 0.0)
        scale = torch.where(valid, scale, 0.0)
        n_valid = max(int(valid.sum()), 1)
        if case.reduction == "none":
            loss, lscale, w = row.reshape(case.lead), scale.reshape(case.lead), 1.0
        elif case.reduction == "sum":
            loss, lscale, w = row.sum(), scale.sum(), 1.0
        else:
            loss, lscale, w = row.sum() / n_valid, scale.sum() / n_valid, 1.0 / n_valid
    acc = F64 if F64 in (case.sdt, case.tdt) else F32
    ta = tol_acc(V, acc)
    ldt = acc
    out = {"loss": loss.detach(), "loss_tol": tol(loss.detach(), ldt, acc, ta * lscale)}
    if not case.loss_only:
        (loss * inp["go"]).sum().backward()
        go_row = (
            inp["go"].reshape(-1).abs() if case.reduction == "none" else inp["go"].abs().expand(R)
        )
        floor_row = torch.where(valid, (sw * T + hw) * go_row * w, 0.0)
        for name, x, dt in (("grad_s", leaves[0], case.sdt), ("grad_t", leaves[1], case.tdt)):
            gexp = x.grad if x.grad is not None else torch.zeros_like(x)  # term not used
            gscale = torch.maximum(gexp.abs().amax(-1), floor_row)[:, None]
            out[name] = gexp.reshape(*case.lead, V)
            out[name + "_tol"] = tol(gexp, dt, acc, ta * gscale).reshape(*case.lead, V)
    return out


# ------------------------------------------------------------------------------------------------
# The fused linear op (kdfused.linear_kd_loss): one path per device ("cpu:linear", "cuda:linear")
# ------------------------------------------------------------------------------------------------
# Its logits come from GEMMs in the student's (teacher's) dtype, so they carry the rounding of
# that dtype, which the per-element model above does not describe. A linear output passes when
#     |got - expected| <= LIN_RTOL[dtype] * max |expected|   (over the output tensor)
# with dtype the coarser of the two sides' dtypes; float64 expected values from the given inputs.
LIN_RTOL = {F64: 1e-10, F32: 2e-5, F16: 1e-2, BF16: 4e-2}
LIN_PAIRS = [(F32, F32), (BF16, BF16), (F16, F32), (F64, F64), (BF16, F16), (F32, F64)]


@dataclass
class LinearCase:
    idx: int
    divergence: str
    sdt: torch.dtype
    tdt: torch.dtype
    lead: tuple
    H: int
    Ht: int
    V: int
    reduction: str
    chunk_size: Optional[int]
    temperature: float = 2.0
    soft_weight: float = 0.7
    hard_weight: float = 0.3
    beta: float = 0.3
    labels: bool = True
    ignore: str = "some"  # "none", "some", "chunk" (every row of the second chunk) or "all"
    ignore_index: int = -100
    teacher: str = "hidden"  # or "logits"
    bias: bool = True
    grad_output: str = "random"
    loss_only: bool = False
    big: bool = False
    transform: tuple = TRANSFORMS[0]

    def describe(self) -> str:
        dims = "x".join(str(d) for d in self.lead) + f" H={self.H} V={self.V}"
        middle = [f"chunk={self.chunk_size}", f"teacher={self.teacher}"]
        flags = (
            (_transform_text(self.transform), self.transform != TRANSFORMS[0]),
            (f"ignored:{self.ignore}", self.labels and self.ignore != "none"),
            ("no-labels", not self.labels),
            ("no-bias", not self.bias),
            ("grad_output=1", self.grad_output == "one"),
            ("no_grad", self.loss_only),
        )
        return _describe(self, f"linear#{self.idx}", dims, middle, flags)


def make_linear_cases(divergences, quick: bool = False) -> list:
    """Two cases per divergence (one with --quick), cycling dtype pairs, reductions, V (the CUDA
    kernel's warp and block paths), chunk sizes, teacher forms, ignored rows and chunks."""
    cases = []
    for di, div in enumerate(divergences):
        for k in range(1 if quick else 2):
            i = 2 * di + k
            sdt, tdt = LIN_PAIRS[i % len(LIN_PAIRS)]
            if div == "tvd" and (sdt in (F16, BF16) or tdt in (F16, BF16)):
                # TVD's gradient jumps where q = p (sign(q - p)); 16-bit GEMM logits move q and p by
                # ~1e-3, enough to flip elements near a tie against the float64 expectation: an
                # O(1) difference on those elements that no rounding tolerance describes.
                sdt, tdt = F32, F32
            V = [37, 3001, 1000, 5003, 129][i % 5]
            hw = [0.3, 0.0, 0.5][i % 3]
            cases.append(
                LinearCase(
                    i,
                    div,
                    sdt,
                    tdt,
                    (2, 9) if i % 4 == 3 else (2 + (7 * i) % 29,),
                    H=[16, 40, 64][i % 3],
                    Ht=[16, 24][i % 2],
                    V=V,
                    reduction=REDUCTIONS[i % 4],
                    chunk_size=[4, None, 7, 5][i % 4],
                    temperature=[1.0, 2.0, 0.5, 4.0][i % 4],
                    hard_weight=hw,
                    labels=hw > 0 or i % 2 == 0,
                    ignore=["some", "chunk", "none", "some", "all"][i % 5],
                    ignore_index=[-100, -1][i % 2],
                    teacher="logits" if i % 3 == 2 else "hidden",
                    bias=i % 4 != 1,
                    grad_output="one" if i % 3 == 1 else "random",
                    loss_only=i % 7 == 5,
                    transform=TRANSFORMS[(i + 1) % len(TRANSFORMS)],
                )
            )
    return cases


def make_linear_inputs(case: LinearCase, seed: int) -> dict:
    """CPU inputs of a linear case, replayable from (seed, case.idx); logits come out O(3)."""
    g = torch.Generator().manual_seed(seed * 1000033 + case.idx)
    R, V = math.prod(case.lead), case.V

    def rnd(*shape, scale=1.0, dt=case.sdt):
        return (scale * torch.randn(shape, generator=g, dtype=F64)).to(dt)

    x = {"sh": rnd(*case.lead, case.H), "sw": rnd(V, case.H, scale=3.0 / case.H**0.5)}
    x["sb"] = rnd(V, scale=0.5) if case.bias else None
    x["th"] = x["tw"] = x["tb"] = x["tl"] = None
    if case.teacher == "hidden":
        x["th"] = rnd(*case.lead, case.Ht, dt=case.tdt)
        x["tw"] = rnd(V, case.Ht, scale=3.0 / case.Ht**0.5, dt=case.tdt)
        x["tb"] = rnd(V, scale=0.5, dt=case.tdt) if case.bias else None
    else:
        x["tl"] = rnd(*case.lead, V, scale=3.0, dt=case.tdt)
    y = torch.randint(0, V, (R,), generator=g)
    chunk = case.chunk_size or R
    if case.ignore == "some":
        y[1::3] = case.ignore_index
    elif case.ignore == "chunk":
        y[chunk : 2 * chunk] = case.ignore_index
    elif case.ignore == "all":
        y[:] = case.ignore_index
    x["y"] = y.reshape(case.lead) if case.labels else None
    if case.reduction == "none":
        go = torch.rand(R, generator=g, dtype=F64) + 0.5
        go = (torch.ones(R, dtype=F64) if case.grad_output == "one" else go).reshape(case.lead)
    else:
        go = torch.tensor(1.0 if case.grad_output == "one" else 1.75, dtype=F64)
    x["go"] = go
    return x


def linear_on_device(inp: dict, device: str) -> dict:
    return {k: (v.to(device) if v is not None else None) for k, v in inp.items()}


def linear_expected(case: LinearCase, inp: dict) -> dict:
    """float64 loss and gradients of student_hidden / weight / bias (CPU tensors), and their
    tolerances (LIN_RTOL)."""
    grad_on = not case.loss_only
    f64 = {k: (v.to(F64) if v is not None else None) for k, v in inp.items() if k != "y"}
    sh, sw, sb = (
        f64[k].requires_grad_(grad_on) if f64[k] is not None else None for k in ("sh", "sw", "sb")
    )
    T, w_soft, w_hard = case.temperature, case.soft_weight, case.hard_weight
    with torch.set_grad_enabled(grad_on):
        s = F.linear(sh, sw, sb).reshape(-1, case.V)
        if case.teacher == "hidden":
            t = F.linear(f64["th"], f64["tw"], f64["tb"]).reshape(-1, case.V)
        else:
            t = f64["tl"].reshape(-1, case.V)
        s, t = _transformed(s, case, 0), _transformed(t, case, 1)
        R = s.shape[0]
        y = inp["y"].reshape(-1) if inp["y"] is not None else None
        valid = (y != case.ignore_index) if y is not None else torch.ones(R, dtype=torch.bool)
        row = torch.zeros(R, dtype=F64)
        if w_soft != 0:
            lq, lp = F.log_softmax(s / T, -1), F.log_softmax(t / T, -1)
            row = row + w_soft * T * T * _divergence(
                case.divergence, lp, lq, lp.exp(), lq.exp(), case.beta
            )
        if w_hard != 0:
            yy = torch.where(valid, y, 0)
            row = row + w_hard * (torch.logsumexp(s, -1) - s.gather(1, yy[:, None])[:, 0])
        row = torch.where(valid, row, 0.0)
        if case.reduction == "none":
            loss = row.reshape(case.lead)
        elif case.reduction == "sum":
            loss = row.sum()
        else:
            loss = row.sum() / max(int(valid.sum()), 1)
    rtol = max(LIN_RTOL[case.sdt], LIN_RTOL[case.tdt])

    def with_tol(name, x):
        x = x.detach()
        out[name] = x
        top = x.abs().max().item() if x.numel() else 0.0
        out[name + "_tol"] = torch.full_like(x, rtol * top + FLOOR_ACC[F64])

    out = {}
    with_tol("loss", loss)
    if grad_on:
        (loss * inp["go"]).sum().backward()
        with_tol("grad_h", sh.grad)
        with_tol("grad_w", sw.grad)
        if sb is not None:
            with_tol("grad_b", sb.grad)
    return out


def tol_acc(V: int, acc: torch.dtype) -> float:
    return 16.0 * torch.finfo(acc).eps * (4.0 + math.sqrt(max(V, 1)))


def tol(exp: torch.Tensor, out_dtype, acc, acc_term) -> torch.Tensor:
    return RTOL_OUT[out_dtype] * exp.abs() + acc_term + max(FLOOR_OUT[out_dtype], FLOOR_ACC[acc])


def error_ratio(got: Optional[torch.Tensor], exp: torch.Tensor, tol_: torch.Tensor) -> float:
    """max |got - exp| / tol over the elements; inf for a wrong shape, a missing nonzero
    gradient, or non-finite values (NaN, inf) where they are not expected."""
    if got is None:  # autograd's "no gradient": right only where the gradient is all zero
        return 0.0 if not exp.any() else math.inf
    if tuple(got.shape) != tuple(exp.shape):
        return math.inf
    g = got.detach().to("cpu", F64)
    fin = torch.isfinite(exp)
    if not torch.equal(fin, torch.isfinite(g)) or not torch.equal(g[~fin], exp[~fin]):
        return math.inf
    if not fin.any():
        return 0.0
    return float(((g[fin] - exp[fin]).abs() / tol_[fin]).max())


# ------------------------------------------------------------------------------------------------
# The top-k op (kdfused.topk_kd_loss): one path per CPU instruction set ("cpu:topk:<isa>", the
# scalar one runs the CUDA kernel's per-element code) and one per CUDA device ("cuda:topk")
# ------------------------------------------------------------------------------------------------
# Expected values and tolerances: the module's docstring ("Top-k").
TOPK_PAIRS = [  # (student dtype, stored values' dtype)
    (F32, F32),
    (BF16, F32),
    (F64, F64),
    (BF16, BF16),
    (F32, BF16),
    (F64, F32),
    (F16, F32),
]
# (V, k): the CUDA kernel runs a warp per row up to V = 1024 and a CTA per row above; k = V (the
# whole vocabulary stored) and k = 1. Every third case (--quick) still meets each of them.
TOPK_SIZES = [(1000, 24), (2049, 20), (7, 7), (8191, 64), (100, 1)]


def topk_combos(divergences) -> list:
    """Every allowed (support, values, divergence) with a divergence of ``divergences``."""
    return [
        (support, values, div)
        for support in SUPPORTS
        for values in VALUE_KINDS
        for div in divergences
        if not (support == "full" and div not in TOPK_DIVERGENCES)
        and not (support == "tail" and values == "logits")
    ]


@dataclass
class TopKCase:
    idx: int
    divergence: str
    support: str
    values: str
    sdt: torch.dtype
    tdt: torch.dtype  # the stored values' dtype
    lead: tuple
    V: int
    k: int
    reduction: str
    temperature: float = 2.0
    soft_weight: float = 0.7
    hard_weight: float = 0.0
    beta: float = 0.5
    labels: bool = True  # labels passed: one row in four ignored
    ignore_index: int = -100
    padded: bool = True  # -inf padding in some rows (index: a valid one's or 0) and a row of it
    index_dtype: torch.dtype = torch.int64
    strided: bool = False  # the student a row-strided view of a wider tensor
    top: bool = True  # the stored entries are the teacher's top-k (else k random columns)
    grad_output: str = "random"
    loss_only: bool = False
    big: bool = False  # (no large-vocabulary top-k case: every path runs them all)
    transform: tuple = TRANSFORMS[0]

    def describe(self) -> str:
        dims = "x".join(str(d) for d in self.lead) + f"x{self.V} k={self.k}"
        middle = [self.support, self.values, f"T={self.temperature}"]
        flags = (
            (_transform_text(self.transform), self.transform != TRANSFORMS[0]),
            ("strided", self.strided),
            ("padded", self.padded),
            ("ignored:some", self.labels),
            ("no-labels", not self.labels),
            ("int32", self.index_dtype == torch.int32),
            ("random-k", not self.top),
            ("grad_output=1", self.grad_output == "one"),
            ("no_grad", self.loss_only),
        )
        return _describe(self, f"topk#{self.idx}", dims, middle, flags)


def topk_options(case: TopKCase) -> dict:
    """The case's options as keywords of topk_kd_loss."""
    names = ("temperature", "soft_weight", "hard_weight", "divergence", "support", "values")
    kw = {n: getattr(case, n) for n in names + ("ignore_index", "reduction")}
    if case.divergence == "jsd":
        kw["beta"] = case.beta
    return kw | transform_options(case)


def make_topk_cases(divergences, quick: bool = False) -> list:
    """One case per allowed (support, values, divergence), cycling the dtype pairs, (V, k), the
    temperature, the hard term, the reductions, the student transform (the teacher's with stored
    logits only), int32 indices, 3-d and strided inputs; --quick: every third."""
    cases = []
    for i, (support, values, div) in enumerate(topk_combos(divergences)):
        sdt, tdt = TOPK_PAIRS[i % len(TOPK_PAIRS)]
        V, k = TOPK_SIZES[i % len(TOPK_SIZES)]
        if support == "tail":
            k = max(1, min(k, V // 3))  # a tail with mass on both sides (no clamp at 1 - 1e-7)
        tf = TRANSFORMS[(i // 2) % len(TRANSFORMS)]
        if values == "logprobs":
            tf = (tf[0], 1.0, tf[2], None)  # final log-probabilities take no teacher transform
        N = 4 + (i * 5) % 9
        hw = [0.0, 0.3, 0.0, 0.5][i % 4]
        cases.append(
            TopKCase(
                i,
                div,
                support,
                values,
                sdt,
                tdt,
                (2, (N + 1) // 2) if i % 5 == 4 else (N,),
                V,
                k,
                REDUCTIONS[i % 4],
                temperature=[2.0, 1.0, 0.5, 1.5][i % 4] if support != "tail" else [1.0, 2.0][i % 2],
                hard_weight=hw,
                beta=[0.5, 0.3, 0.0, 1.0][i % 4],
                labels=hw > 0 or i % 4 == 0,
                ignore_index=[-100, -1][i % 2],
                padded=k >= 2,
                index_dtype=torch.int32 if i % 4 == 2 else torch.int64,
                strided=sdt in HALF and i % 2 == 1,
                top=i % 4 != 3,
                grad_output="one" if i % 4 == 0 else "random",
                loss_only=i % 7 == 3,
                transform=tf,
            )
        )
    return [c for c in cases if c.idx % 3 == 0] if quick else cases


def make_topk_inputs(case: TopKCase, seed: int) -> dict:
    """CPU inputs of a top-k case, replayable from (seed, case.idx): the student ('s', wider
    when strided: the view is [:, :V]), the stored 'idx' / 'val', labels, grad_output. Row 1
    (when padded): its second half padding with the index of its first entry (a duplicate),
    row 2: padding at index 0 (TRL's) after the first entry; row 3: no valid entry (only its
    hard term). With labels, rows 0, 4, 8, ... are ignored."""
    g = torch.Generator().manual_seed(seed * 1000039 + case.idx)
    R, V, k = math.prod(case.lead), case.V, case.k
    s = (2 * torch.randn(R, V + (5 if case.strided else 0), generator=g, dtype=F64)).to(case.sdt)
    t = 2 * torch.randn(R, V, generator=g, dtype=F64)
    if case.top:
        idx = t.topk(k, dim=-1).indices
    else:
        idx = torch.stack([torch.randperm(V, generator=g)[:k] for _ in range(R)])
    # stored logits, or the teacher's log-probabilities at T = 1 (topk_teacher's)
    vals = t if case.values == "logits" else F.log_softmax(t, -1)
    vals = vals.gather(1, idx).to(case.tdt)
    if case.padded:
        half = max(1, k // 2)
        vals[1 % R, half:] = float("-inf")
        idx[1 % R, half:] = idx[1 % R, 0]
        if R > 2:
            vals[2, 1:] = float("-inf")
            idx[2, 1:] = 0
        if R > 3:
            vals[3] = float("-inf")
            idx[3] = idx[3, 0]
    y = torch.randint(0, V, (R,), generator=g)
    if case.labels:
        y[::4] = case.ignore_index  # rows 0, 4, ...: not the padded rows 1 to 3
    if case.reduction == "none":
        go = torch.rand(R, generator=g, dtype=F64) + 0.5
        go = torch.ones(R, dtype=F64) if case.grad_output == "one" else go
    else:
        go = torch.tensor(1.0 if case.grad_output == "one" else 1.75, dtype=F64)
    return {
        "s": s,
        "idx": idx.to(case.index_dtype),
        "val": vals,
        "y": y.reshape(case.lead) if case.labels else None,
        "go": go.reshape(case.lead) if case.reduction == "none" else go,
    }


def topk_on_device(inp: dict, case: TopKCase, device: str):
    """(student, indices, values, labels, grad_output) on the device, the views taken there."""
    s = inp["s"].to(device)[:, : case.V]
    if case.strided and s.is_contiguous():
        raise AssertionError(f"top-k case {case.idx}: the strided student came out contiguous")
    idx, val = inp["idx"].to(device), inp["val"].to(device)
    if len(case.lead) > 1:
        s, idx, val = (x.unflatten(0, case.lead) for x in (s, idx, val))
    y = inp["y"].to(device) if inp["y"] is not None else None
    return s, idx, val, y, inp["go"].to(device)


def topk_expected(case: TopKCase, inp: dict) -> dict:
    """float64 loss and student gradient (kdfused.reference.topk_kd_loss, autograd) and the
    tolerance of every output element (CPU tensors)."""
    ref = _reference_topk
    V, T, sw, hw = case.V, case.temperature, case.soft_weight, case.hard_weight
    s = inp["s"][:, :V].to(F64).requires_grad_(not case.loss_only)
    idx, val = inp["idx"].long(), inp["val"].to(F64)
    R = s.shape[0]
    y = inp["y"].reshape(-1) if inp["y"] is not None else None
    rows = (y != case.ignore_index) if y is not None else torch.ones(R, dtype=torch.bool)
    with torch.set_grad_enabled(not case.loss_only):
        loss = ref.topk_kd_loss(
            s.reshape(*case.lead, V),
            idx.reshape(*case.lead, case.k),
            val.reshape(*case.lead, case.k),
            inp["y"],
            **topk_options(case),
        )
    # The size of the terms a kernel adds and cancels, per row (as the buckets of the reference).
    with torch.no_grad():
        z = _transformed(s.detach(), case, 0)
        scale = torch.zeros(R, dtype=F64)
        valid = (val != -math.inf) & rows[:, None]
        if sw != 0:
            v = val if case.values == "logprobs" else _transformed(val, case, 1)
            lp, lq, mask = ref._buckets(z, idx, v, valid, T, case.support, case.values)
            lp, lq = torch.where(mask, lp, 0.0), torch.where(mask, lq, 0.0)
            p, q = torch.where(mask, lp.exp(), 0.0), torch.where(mask, lq.exp(), 0.0)
            terms = (p + q) * (lp.abs() + lq.abs() + 1)
            if case.support == "tail":  # log(1 - Q): Q's error over 1 - Q
                cond = torch.expm1(-lp[:, -1]) + torch.expm1(-lq[:, -1])
                terms[:, -1] += (p[:, -1] + q[:, -1]) * cond
            has = valid.any(-1)
            scale += torch.where(has, sw * T * T * terms.sum(-1), 0.0)
        if hw != 0:
            yy = torch.where(rows, y, 0)
            lse = torch.logsumexp(z, -1)
            scale += hw * (lse.abs() + z.gather(1, yy[:, None])[:, 0].abs())
        scale = torch.where(rows, scale, 0.0)
    n_valid = max(int(rows.sum()), 1)
    if case.reduction == "none":
        lscale, w = scale.reshape(case.lead), 1.0
    elif case.reduction == "sum":
        lscale, w = scale.sum(), 1.0
    else:
        lscale, w = scale.sum() / n_valid, 1.0 / n_valid
    acc = F64 if F64 in (case.sdt, case.tdt) else F32
    ta = tol_acc(V, acc)
    out = {"loss": loss.detach(), "loss_tol": tol(loss.detach(), acc, acc, ta * lscale)}
    if not case.loss_only:
        (loss * inp["go"]).sum().backward()
        go_row = (
            inp["go"].reshape(-1).abs() if case.reduction == "none" else inp["go"].abs().expand(R)
        )
        floor_row = torch.where(rows, (sw * T + hw) * go_row * w, 0.0)
        gexp = s.grad if s.grad is not None else torch.zeros_like(s)
        gscale = torch.maximum(gexp.abs().amax(-1), floor_row)[:, None]
        out["grad_s"] = gexp.reshape(*case.lead, V)
        out["grad_s_tol"] = tol(gexp, case.sdt, acc, ta * gscale).reshape(*case.lead, V)
    return out
