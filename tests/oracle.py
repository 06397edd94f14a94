"""Independent float64 oracle for kdfused.kd_loss, plus the comparison helpers the tests share.

The oracle follows docs/design.md in closed form (it does NOT call kdfused.reference and does not
use autograd): per row, a = s/T, b = t/T, log q = a - LSE(a), log p = b - LSE(b),

    KL   = sum_{p>0} p (log p - log q)          CE = -sum_{p>0} p log q          hard = LSE(s) - s_y
    row  = soft_weight T^2 D + hard_weight hard     (a term with weight exactly 0 is not computed)
    d/ds = soft_weight T (q - p) + hard_weight (softmax(s) - onehot(y))
    d/dt = soft_weight T p (log p - log q - KL)     (KL)
         = soft_weight T p (-log q - CE)            (CE)

and reverse KL, the generalised JSD (beta) and TVD with their gradients (_soft_new below).

Everything is computed in float64 from the *given* (already quantised) inputs, so the only error a
correct implementation can show is its own accumulation error and the rounding of its outputs.

Besides the values the oracle returns an *error scale* for every output: a first-order bound on
the magnitude of the quantities a straightforward float32/float64 evaluation cancels or rounds
(log-sum-exps relative to the row maximum, |log p|, |log q|, sum p |b - a|, ...). The tolerance of
a comparison is ``tol_acc(V, acc_dtype) * error_scale + rtol_out * |expected| + floor_out``: the
accumulation error of an implementation that subtracts the row maximum (as ATen's softmax and the
fused kernel both do) and the rounding of the output dtype. It is shift-invariant on purpose: a
kernel that loses accuracy for logits ~ 1e4 because it forms LSE(a) explicitly is caught.

Size: an independent closed-form float64 implementation with error bounds for every
divergence; splitting it would split the derivations from their bounds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

F64 = torch.float64
DIVERGENCES = ("kl", "ce", "reverse_kl", "jsd", "tvd")
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
DTYPE_IDS = {
    torch.float16: "f16",
    torch.bfloat16: "bf16",
    torch.float32: "f32",
    torch.float64: "f64",
}

# Relative rounding of a correctly rounded output of each dtype (half an ulp, relative).
RTOL_OUT = {
    torch.float16: 2.0**-11,
    torch.bfloat16: 2.0**-8,
    torch.float32: 2.0**-24,
    torch.float64: 2.0**-53,
}
# Absolute floor: one subnormal ulp for float16, the smallest normal for the others (allows
# flush-to-zero of results that small).
FLOOR_OUT = {
    torch.float16: 2.0**-24,
    torch.bfloat16: 2.0**-126,
    torch.float32: 2.0**-126,
    torch.float64: 2.0**-1022,
}
# Absolute floor from the accumulation type: a gradient element is a product of a probability
# and a coefficient (T, log-ratios up to ~1e3); probabilities below the accumulation type's
# smallest normal (exp() underflow, flush-to-zero in vectorised exp) lose all precision, so
# results below ~2^-100 (float32) / 2^-1000 (float64) are not compared.
FLOOR_ACC = {torch.float32: 2.0**-100, torch.float64: 2.0**-1000}


def acc_dtype(*dtypes: torch.dtype) -> torch.dtype:
    return torch.float64 if torch.float64 in dtypes else torch.float32


def tol_acc(V: int, acc: torch.dtype) -> float:
    """Relative accumulation tolerance: a few units of roundoff times the typical growth of a
    length-V float sum (sqrt(V)), with headroom."""
    eps = torch.finfo(acc).eps
    return 16.0 * eps * (4.0 + math.sqrt(max(V, 1)))


@dataclass
class OracleResult:
    loss: torch.Tensor  # float64, reduced (0-dim) or shape lead for "none"
    row: torch.Tensor  # float64 [N] per-row loss (0 at ignored rows)
    grad_s: torch.Tensor  # float64, shape of student (for the given grad_output)
    grad_t: torch.Tensor  # float64, shape of teacher
    loss_err: torch.Tensor  # float64 error scale of loss (same shape as loss)
    grad_s_err: torch.Tensor
    grad_t_err: torch.Tensor
    n_valid: int


def _lse_parts(x: torch.Tensor):
    """Row maximum m, L = log sum exp(x - m) (in [0, log V]) and log-softmax. All -inf rows: NaN."""
    m = x.max(dim=-1, keepdim=True).values
    xm = x - m
    L = torch.log(torch.exp(xm).sum(dim=-1, keepdim=True))
    return m, L, xm - L


def _where0(cond, x):
    return torch.where(cond, x, torch.zeros_like(x))


def oracle(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: Optional[torch.Tensor] = None,
    *,
    temperature: float = 1.0,
    soft_weight: float = 1.0,
    hard_weight: float = 0.0,
    divergence: str = "kl",
    beta: float = 0.5,
    ignore_index: int = -100,
    reduction: str = "batchmean",
    grad_output=None,
) -> OracleResult:
    assert divergence in DIVERGENCES and reduction in ("batchmean", "mean", "sum", "none")
    assert 0.0 <= beta <= 1.0
    # the generalised JSD's end points are the two KLs (as the fused op defines them)
    if divergence == "jsd" and beta in (0.0, 1.0):
        divergence = "kl" if beta == 0.0 else "reverse_kl"
    lead = tuple(student.shape[:-1])
    V = student.shape[-1]
    s = student.detach().to("cpu", F64).reshape(-1, V)
    t = teacher.detach().to("cpu", F64).reshape(-1, V)
    N = s.shape[0]
    T = float(temperature)
    ws, wh = float(soft_weight), float(hard_weight)

    if labels is not None:
        y = labels.detach().to("cpu", torch.int64).reshape(-1)
        valid = y != ignore_index
    else:
        y = None
        valid = torch.ones(N, dtype=torch.bool)
    n_valid = int(valid.sum())

    row = torch.zeros(N, dtype=F64)
    row_err = torch.zeros(N, dtype=F64)
    gs = torch.zeros(N, V, dtype=F64)
    gt = torch.zeros(N, V, dtype=F64)
    gs_err = torch.zeros(N, V, dtype=F64)
    gt_err = torch.zeros(N, V, dtype=F64)

    if N > 0 and ws != 0.0:
        # Tempered logits relative to the raw row maximum: (s - max s) is exact for nearby values,
        # whereas s / T with |s| ~ 1e4 and T = 0.05 would round every exponent by ~3e-11 -- an
        # error of the oracle itself, larger than float64 tolerances. (A per-row shift changes no
        # probability; all -inf rows keep their NaN.)
        def _shifted(x):
            m = x.max(dim=-1, keepdim=True).values
            return (x - torch.where(torch.isfinite(m), m, torch.zeros_like(m))) / T

        a, b = _shifted(s), _shifted(t)
        ma, La, logq = _lse_parts(a)
        mb, Lb, logp = _lse_parts(b)
        q, p = torch.exp(logq), torch.exp(logp)
        if divergence in ("kl", "ce"):
            D, g_a, g_b, unit, ea, eb = _soft_kl_ce(
                divergence, p, q, logp, logq, a, b, La, Lb, ma, mb
            )
        else:
            D, g_a, g_b, unit, ea, eb = _soft_new(
                divergence,
                float(beta),
                p,
                q,
                logp,
                logq,
                a,
                b,
                La,
                Lb,
                ma,
                mb,
                V,
                acc_dtype(student.dtype, teacher.dtype),
            )
        # D, g_a, g_b: the divergence per row and its derivatives by a = s/T and b = t/T; the
        # loss is ws T^2 D, so the gradients by s and t are ws T g_a and ws T g_b.
        row = row + ws * T * T * D.squeeze(-1)
        gs = gs + ws * T * g_a
        gt = gt + ws * T * g_b
        row_err = row_err + ws * T * T * unit.squeeze(-1)
        gs_err = gs_err + ws * T * ea
        gt_err = gt_err + ws * T * eb

    if N > 0 and wh != 0.0:
        assert y is not None, "hard_weight > 0 needs labels"
        ysafe = torch.where(valid, y, torch.zeros_like(y)).unsqueeze(1)
        ms, Ls, logh = _lse_parts(s)
        h = torch.exp(logh)
        hard = -logh.gather(1, ysafe).squeeze(1)
        row = row + wh * hard
        onehot = torch.zeros(N, V, dtype=F64).scatter_(1, ysafe, 1.0)
        gs = gs + wh * (h - onehot)
        row_err = row_err + wh * (1.0 + Ls.squeeze(-1) + hard.abs())
        # (+ onehot: the rounding of h_y - 1 is relative to 1, not to its result)
        gs_err = gs_err + wh * (_where0(h > 0, h * (1.0 + logh.abs() + 2 * Ls)) + onehot)

    # ignored rows: exactly 0 everywhere (torch.where, so NaN/inf in ignored rows cannot leak)
    row = _where0(valid, row)
    row_err = _where0(valid, row_err)
    vm = valid.unsqueeze(1)
    gs, gt, gs_err, gt_err = (_where0(vm, x) for x in (gs, gt, gs_err, gt_err))

    # reduction and grad_output
    if reduction == "none":
        loss = row.reshape(lead)
        loss_err = row_err.reshape(lead)
        if grad_output is None:
            coef = torch.ones(N, dtype=F64)
        else:
            coef = torch.as_tensor(grad_output).detach().to("cpu", F64).expand(lead).reshape(-1)
    else:
        go = 1.0 if grad_output is None else float(torch.as_tensor(grad_output).double())
        if reduction == "sum":
            loss, loss_err, c = row.sum(), row_err.sum(), go
        else:
            denom = float(max(n_valid, 1))
            loss, loss_err, c = row.sum() / denom, row_err.sum() / denom, go / denom
        coef = torch.full((N,), c, dtype=F64)
    coef = coef.unsqueeze(1)
    gs = _where0(vm, coef * gs)
    gt = _where0(vm, coef * gt)
    gs_err = _where0(vm, coef.abs() * gs_err)
    gt_err = _where0(vm, coef.abs() * gt_err)
    shape = tuple(student.shape)
    return OracleResult(
        loss=loss,
        row=row,
        grad_s=gs.reshape(shape),
        grad_t=gt.reshape(shape),
        loss_err=loss_err,
        grad_s_err=gs_err.reshape(shape),
        grad_t_err=gt_err.reshape(shape),
        n_valid=n_valid,
    )


def _soft_kl_ce(divergence, p, q, logp, logq, a, b, La, Lb, ma, mb):
    """KL(p || q) or -sum p log q per row, its derivatives by a and b, and error scales."""
    has = p > 0
    if divergence == "kl":
        D = _where0(has, p * (logp - logq)).sum(-1, keepdim=True)
        g_b = _where0(has, p * (logp - logq - D))
    else:
        D = _where0(has, -p * logq).sum(-1, keepdim=True)
        g_b = _where0(has, p * (-logq - D))
    g_a = q - p
    # error scales (per unit of relative roundoff)
    absl = _where0(has, p * (logp.abs() + logq.abs())).sum(-1, keepdim=True)
    bma = _where0(has, p * (b - a).abs()).sum(-1, keepdim=True)
    unit = 1.0 + La + Lb + absl + bma + (mb - ma).abs() + D.abs()
    qpart = _where0(q > 0, q * (1.0 + logq.abs() + 2 * La))
    ppart = _where0(has, p * (1.0 + logp.abs() + 2 * Lb))
    ea = qpart + ppart
    eb = _where0(has, p * (1.0 + logp.abs() + logq.abs() + (b - a).abs() + 2 * La + 2 * Lb + unit))
    return D, g_a, g_b, unit, ea, eb


def _soft_new(divergence, beta, p, q, logp, logq, a, b, La, Lb, ma, mb, V, acc):
    """reverse KL, JSD (0 < beta < 1) and TVD per row, their derivatives by a = s/T and b = t/T
    (docs/design.md), and error scales:

        R = KL(q || p)        dR/da = q (log q - log p - R)          dR/db = p - q
        J = beta KL(p || m) + (1 - beta) KL(q || m),  m = beta p + (1 - beta) q
                              dJ/da = (1 - beta) q (log(q/m) - KL(q || m))
                              dJ/db = beta p (log(p/m) - KL(p || m))
        TVD = 0.5 sum |p - q|,  h = 0.5 sign(q - p)
                              dD/da = q (h - sum q h)                dD/db = p (sum p h - h)
    """
    hp, hq = p > 0, q > 0
    lpa, lqa = _where0(hp, logp.abs()), _where0(hq, logq.abs())
    bma = _where0(hp & hq, (b - a).abs())
    # relative error of each probability from its exponent: (1 + |log p| + 2 LSE)
    ep = _where0(hp, p * (1.0 + lpa + 2 * Lb))
    eq = _where0(hq, q * (1.0 + lqa + 2 * La))
    common = 1.0 + La + Lb + (mb - ma).abs()
    if divergence == "reverse_kl":
        D = _where0(hq, q * (logq - logp)).sum(-1, keepdim=True)
        g_a = _where0(hq, q * (logq - logp - D))
        g_b = p - q
        unit = common + _where0(hq, q * (lqa + logp.abs() + bma)).sum(-1, keepdim=True) + D.abs()
        ea = _where0(hq, q * (1.0 + lqa + logp.abs() + bma + 2 * La + 2 * Lb + unit))
        eb = ep + eq
    elif divergence == "jsd":
        lm = torch.logaddexp(math.log(beta) + logp, math.log1p(-beta) + logq)
        kpm = _where0(hp, p * (logp - lm)).sum(-1, keepdim=True)
        kqm = _where0(hq, q * (logq - lm)).sum(-1, keepdim=True)
        D = beta * kpm + (1.0 - beta) * kqm
        g_a = (1.0 - beta) * _where0(hq, q * (logq - lm - kqm))
        g_b = beta * _where0(hp, p * (logp - lm - kpm))
        lma = _where0(hp | hq, lm.abs())
        unit = (
            common
            + ((ep + eq) * (1.0 + lpa + lqa + lma)).sum(-1, keepdim=True)
            + _where0(hp | hq, (p + q) * bma).sum(-1, keepdim=True)
            + D.abs()
        )
        ea = (1.0 - beta) * (
            _where0(hq, q * (1.0 + lqa + lma + 2 * La + 2 * Lb + unit)) + eq * (1.0 + lqa + lma)
        )
        eb = beta * (
            _where0(hp, p * (1.0 + lpa + lma + 2 * La + 2 * Lb + unit)) + ep * (1.0 + lpa + lma)
        )
    elif divergence == "tvd":
        diff = q - p
        D = 0.5 * diff.abs().sum(-1, keepdim=True)
        h = 0.5 * torch.sign(diff)
        sq = (q * h).sum(-1, keepdim=True)
        sp = (p * h).sum(-1, keepdim=True)
        g_a = q * (h - sq)
        g_b = p * (sp - h)
        e = ep + eq  # the error of p_k - q_k
        unit = common + e.sum(-1, keepdim=True)
        ea = eq * 2.0 + q * (e.sum(-1, keepdim=True))
        eb = ep * 2.0 + p * (e.sum(-1, keepdim=True))
        # Near ties (|q_k - p_k| within rounding) the subgradient's sign is a coin flip for any
        # float evaluation: element k may be off by q_k (p_k), every element i by q_i (p_i)
        # times the tied mass. Allow that (the scale is divided by the tolerance factor).
        tie = (diff != 0) & (diff.abs() <= 4.0 * tol_acc(V, acc) * e)
        if bool(tie.any()):
            k = 1.0 / tol_acc(V, acc)
            ea = ea + k * (_where0(tie, q) + q * _where0(tie, q).sum(-1, keepdim=True))
            eb = eb + k * (_where0(tie, p) + p * _where0(tie, p).sum(-1, keepdim=True))
    else:
        raise AssertionError(divergence)
    return D, g_a, g_b, unit, ea, eb


# ------------------------------------------------------------------------------------------------
# comparison
# ------------------------------------------------------------------------------------------------


def assert_matches(
    got, expected, err, *, out_dtype, V, acc, what="", ctx="", slack=1.0, roundings=1
):
    """Elementwise |got - expected| <= slack * (tol_acc * err) + k (rtol_out |expected| + floor_out)
    with k = `roundings`: how many times the result may be rounded to out_dtype (2 for a gradient
    stored in its dtype by the forward and then scaled by a grad_output != 1).

    Non-finite expected values must be reproduced exactly (NaN where NaN, +-inf where +-inf).
    `got` is upcast to float64 on the CPU first.
    """
    assert got is not None, f"{what}: got None{ctx}"
    got64 = got.detach().to("cpu", F64)
    exp64 = torch.as_tensor(expected, dtype=F64)
    err64 = torch.as_tensor(err, dtype=F64)
    assert tuple(got64.shape) == tuple(exp64.shape), (
        f"{what}: shape {tuple(got64.shape)} != expected {tuple(exp64.shape)}{ctx}"
    )
    if got64.numel() == 0:
        return
    exp_nan = torch.isnan(exp64)
    got_nan = torch.isnan(got64)
    if not torch.equal(exp_nan, got_nan):
        idx = (exp_nan != got_nan).nonzero()[0].tolist()
        raise AssertionError(
            f"{what}: NaN pattern differs, first at {idx}: got {got64[tuple(idx)].item()!r}, "
            f"expected {exp64[tuple(idx)].item()!r} ({int((exp_nan != got_nan).sum())} elements)"
            f"{ctx}"
        )
    exp_inf = torch.isinf(exp64)
    bad_inf = exp_inf & (got64 != exp64)
    if bad_inf.any():
        idx = bad_inf.nonzero()[0].tolist()
        raise AssertionError(
            f"{what}: expected {exp64[tuple(idx)].item()} at {idx}, got {got64[tuple(idx)].item()}"
            f"{ctx}"
        )
    fin = ~(exp_nan | exp_inf)
    tol = (
        slack * tol_acc(V, acc) * torch.nan_to_num(err64, nan=0.0, posinf=0.0)
        + roundings * (RTOL_OUT[out_dtype] * exp64.abs() + FLOOR_OUT[out_dtype])
        + FLOOR_ACC[acc]
    )
    diff = (got64 - exp64).abs()
    viol = fin & ~(diff <= tol)  # also catches a NaN/inf got where a finite value is expected
    if viol.any():
        ratio = torch.where(fin, diff / tol, torch.zeros_like(diff))
        ratio = torch.nan_to_num(ratio, nan=float("inf"))
        flat = int(torch.argmax(ratio.reshape(-1)))
        idx = list(torch.unravel_index(torch.tensor(flat), got64.shape)) if got64.dim() else []
        idx = tuple(int(i) for i in idx)
        raise AssertionError(
            f"{what}: {int(viol.sum())}/{int(fin.sum())} elements out of tolerance; worst at "
            f"{list(idx)}: got {got64[idx].item()!r}, expected {exp64[idx].item()!r}, "
            f"|diff| {diff[idx].item():.3e} > tol {tol[idx].item():.3e} "
            f"(ratio {ratio[idx].item():.3g}; max|expected| {exp64[fin].abs().max().item():.3e})"
            f"{ctx}"
        )


def assert_grad(got, ref, side, like, *, acc=None, rows=None, err=None, what="", **kw):
    """One gradient against the oracle: ``side`` "student" or "teacher" picks ``ref.grad_s`` or
    ``ref.grad_t`` (and its error bound, unless ``err`` is given); ``got`` must exist with the
    dtype and shape of its input ``like``; ``rows`` restricts the comparison to those rows. Other
    keywords go to ``assert_matches`` (ctx, slack, roundings)."""
    exp, exp_err = (
        (ref.grad_s, ref.grad_s_err) if side == "student" else (ref.grad_t, ref.grad_t_err)
    )
    err = exp_err if err is None else err
    label = f"grad_{side} {what}".rstrip()
    assert got is not None and got.dtype == like.dtype and got.shape == like.shape, (
        f"{label}: {None if got is None else (got.dtype, tuple(got.shape))}{kw.get('ctx', '')}"
    )
    if rows is not None:
        got, exp, err = got[rows], exp[rows.cpu()], err[rows.cpu()]
    acc = acc_dtype(like.dtype) if acc is None else acc
    assert_matches(got, exp, err, out_dtype=like.dtype, V=like.shape[-1], acc=acc, what=label, **kw)


def max_ratio(got, expected, err, *, out_dtype, V, acc) -> float:
    """The worst |diff| / tol (for calibration and reporting)."""
    got64 = got.detach().to("cpu", F64)
    exp64 = torch.as_tensor(expected, dtype=F64)
    fin = torch.isfinite(exp64)
    if not fin.any():
        return 0.0
    tol = (
        tol_acc(V, acc) * torch.nan_to_num(torch.as_tensor(err, dtype=F64), nan=0.0, posinf=0.0)
        + RTOL_OUT[out_dtype] * exp64.abs()
        + FLOOR_OUT[out_dtype]
        + FLOOR_ACC[acc]
    )
    return float(((got64 - exp64).abs() / tol)[fin].max())


# ------------------------------------------------------------------------------------------------
# inputs
# ------------------------------------------------------------------------------------------------


def make_logits(shape, dtype, device, gen, scale=3.0, offset=0.0):
    """Random normal logits, generated in float64 on the CPU (reproducible from the generator)."""
    x = torch.randn(tuple(shape), generator=gen, dtype=F64) * scale + offset
    return x.to(dtype).to(device)


def make_labels(lead, V, device, gen, ignore_frac=0.25, ignore_index=-100, dtype=torch.int64):
    y = torch.randint(0, V, tuple(lead), generator=gen, dtype=torch.int64)
    if ignore_frac > 0:
        drop = torch.rand(tuple(lead), generator=gen) < ignore_frac
        y = torch.where(drop, torch.full_like(y, ignore_index), y)
    return y.to(dtype).to(device)


def random_mask(N, V, gen, frac, device):
    """A random mask (True = masked) with at least one unmasked entry per row."""
    m = torch.rand((N, V), generator=gen) < frac
    keep = torch.randint(0, V, (N,), generator=gen)
    m[torch.arange(N), keep] = False
    return m.to(device)


def loss_dtype_for(sd: torch.dtype, td: torch.dtype) -> torch.dtype:
    return torch.float64 if torch.float64 in (sd, td) else torch.float32


def run_op(fn, s, t, labels=None, *, grad_student=True, grad_teacher=False, grad_output=None, **kw):
    """Calls fn on fresh leaf copies of s and t and runs backward; returns (loss, gs, gt).

    grad_output None: loss.backward() for a scalar loss, loss.sum().backward() for "none"."""
    s_ = s.detach().clone().requires_grad_(grad_student)
    t_ = t.detach().clone().requires_grad_(grad_teacher)
    loss = fn(s_, t_, labels, **kw)
    if grad_student or grad_teacher:
        if grad_output is None:
            (loss if loss.dim() == 0 else loss.sum()).backward()
        else:
            loss.backward(grad_output)
    return loss.detach(), s_.grad, t_.grad


def check_against_oracle(
    fn,
    s,
    t,
    labels=None,
    *,
    grad_teacher=False,
    grad_output=None,
    ctx="",
    slack=1.0,
    check_grads=True,
    **kw,
):
    """Runs fn forward+backward and compares loss (value, dtype, shape) and gradients with the
    oracle. Returns (loss, gs, gt, oracle_result)."""
    loss, gs, gt = run_op(
        fn,
        s,
        t,
        labels,
        grad_student=check_grads,
        grad_teacher=grad_teacher and check_grads,
        grad_output=grad_output,
        **kw,
    )
    ref = oracle(s, t, labels, grad_output=grad_output, **kw)
    # A gradient scaled by a grad_output != 1 may be rounded twice (stored by the forward in its
    # input's dtype, then scaled); the grad_output itself must not be rounded to that dtype
    # (test_autograd.py::test_grad_output_not_rounded_to_grad_dtype).
    rr = 1 if grad_output is None else 2
    V = s.shape[-1]
    acc = acc_dtype(s.dtype, t.dtype)
    ldt = loss_dtype_for(s.dtype, t.dtype)
    assert loss.dtype == ldt, f"loss dtype {loss.dtype}, expected {ldt}{ctx}"
    assert loss.device == s.device, f"loss device {loss.device}, expected {s.device}{ctx}"
    assert_matches(
        loss, ref.loss, ref.loss_err, out_dtype=ldt, V=V, acc=acc, what="loss", ctx=ctx, slack=slack
    )
    if check_grads:
        common = dict(acc=acc, ctx=ctx, slack=slack, roundings=rr)
        assert_grad(gs, ref, "student", s, **common)
        if grad_teacher and gt is None and (ref.grad_t == 0).all():
            pass  # a teacher gradient that is identically 0 (soft_weight == 0) may be None
        elif grad_teacher:
            assert_grad(gt, ref, "teacher", t, **common)
        else:
            assert gt is None
    return loss, gs, gt, ref
