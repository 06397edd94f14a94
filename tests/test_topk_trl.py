"""kdfused.reference.topk_kd_loss against TRL's own server-distillation loss, and its "full"
support against kdfused.reference.kd_loss with a teacher masked outside its stored entries.

TRL (trl.experimental.server_distillation) distils from a teacher server's top-k log-probabilities:
``loss_add_tail=False`` renormalises both sides over the stored entries (kdfused's support
"renormalized"), ``loss_add_tail=True`` adds a tail bucket with the rest of the mass (support
"tail"); entries the server did not fill are -inf with index 0. The loss is built here exactly as
``ServerDistillationTrainer._compute_server_forward_kl_loss`` builds it, from TRL's real
``_add_tail_bucket`` and ``_jsd_divergence``, for every beta. kdfused multiplies the soft term by
T^2; TRL does not.

Everything in float64; random inputs on every run (the seed is printed; KDFUSED_TEST_SEED
replays a run).
"""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F

from kdfused.reference import kd_loss as ref_kd_loss
from kdfused.reference import topk_kd_loss as ref_topk

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
pytest.importorskip("trl")
trl_server = pytest.importorskip("trl.experimental.server_distillation.server_distillation_trainer")

F64 = torch.float64
NEG_INF = -math.inf
# Both sides compute the same float64 quantities in a different order.
TOL = dict(rtol=1e-10, atol=1e-10)


def trl_rows(student_logits, indices, teacher_logprobs, *, beta, add_tail, T):
    """TRL's per-token divergence (before its reduction), as _compute_server_forward_kl_loss
    computes it, with beta in place of its 0.0."""
    student_log_probs = F.log_softmax(student_logits / T, dim=-1)
    valid = teacher_logprobs > NEG_INF
    neg_inf = torch.full((), NEG_INF, dtype=student_log_probs.dtype)
    student_topk = torch.where(valid, student_log_probs.gather(-1, indices), neg_inf)
    teacher_topk = torch.where(valid, teacher_logprobs, neg_inf)
    if add_tail:
        student_sparse, support_mask = trl_server._add_tail_bucket(student_topk, valid)
        teacher_sparse, _ = trl_server._add_tail_bucket(teacher_topk, valid)
    else:
        support_mask = valid
        student_sparse = student_topk - torch.logsumexp(student_topk, dim=-1, keepdim=True)
        teacher_sparse = teacher_topk - torch.logsumexp(teacher_topk, dim=-1, keepdim=True)
    jsd = trl_server._jsd_divergence(student_sparse, teacher_sparse, beta, support_mask)
    return jsd.sum(-1)


def make_case(gen, N, V, k, T, *, pad_rows=True):
    """Student logits, a teacher server's top-k log-probabilities at temperature T (rows
    descending), and TRL's padding: some rows with their last entries -inf at index 0 (a
    duplicate of a valid 0 in row 0), one row of padding only."""
    s = torch.randn(N, V, generator=gen, dtype=F64) * 2.0
    t = s + torch.randn(N, V, generator=gen, dtype=F64) * 2.0
    t[0, 0] = t[0].max() + 1.0  # row 0's top entry is index 0: its padding duplicates it
    lp, idx = torch.topk(F.log_softmax(t / T, dim=-1), k, dim=-1)
    if pad_rows and N >= 4 and k >= 3:
        for r, keep in ((0, k - 2), (2, 1), (3, 0)):
            lp[r, keep:] = NEG_INF
            idx[r, keep:] = 0
    return s, idx, lp


def kdfused_rows(s, idx, lp, *, divergence, beta, support, T, **kw):
    return ref_topk(
        s, idx, lp, temperature=T, divergence=divergence, beta=beta, support=support,
        values="logprobs", reduction="none", **kw,
    )  # fmt: skip


def _names(beta):
    """The kdfused divergences equal to TRL's generalised JSD at beta."""
    return {0.0: ["jsd", "kl"], 1.0: ["jsd", "reverse_kl"]}.get(beta, ["jsd"])


@pytest.mark.parametrize("add_tail", [False, True], ids=["renormalized", "tail"])
@pytest.mark.parametrize("beta", [0.0, 0.25, 0.5, 1.0])
@pytest.mark.parametrize("T", [1.0, 2.0])
@pytest.mark.parametrize("V,k", [(50, 8), (300, 20), (7, 7)])
def test_reference_equals_trl(gen, add_tail, beta, T, V, k):
    s, idx, lp = make_case(gen, 6, V, k, T)
    support = "tail" if add_tail else "renormalized"
    s_trl = s.clone().requires_grad_()
    want = trl_rows(s_trl, idx, lp, beta=beta, add_tail=add_tail, T=T)
    (g_trl,) = torch.autograd.grad(want.sum(), s_trl)
    some = (lp > NEG_INF).any(-1)
    assert not some.all()  # a padding-only row: 0 loss and 0 gradient on both sides
    for divergence in _names(beta):
        s_kd = s.clone().requires_grad_()
        rows = kdfused_rows(s_kd, idx, lp, divergence=divergence, beta=beta, support=support, T=T)
        (g,) = torch.autograd.grad(rows.sum() / (T * T), s_kd)
        torch.testing.assert_close(rows / (T * T), want, **TOL)
        torch.testing.assert_close(g, g_trl, **TOL)
        assert (g[~some] == 0).all() and (rows[~some] == 0).all()


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_tail_clamp_equals_trl(gen, beta):
    """Every entry stored (k = V): the stored mass is 1, the tail sum clamps at exp(-1e-7) on
    both sides and nothing flows through the student's tail (torch.clamp's gradient)."""
    s, idx, lp = make_case(gen, 4, 12, 12, 1.0, pad_rows=False)
    s_trl = s.clone().requires_grad_()
    want = trl_rows(s_trl, idx, lp, beta=beta, add_tail=True, T=1.0)
    (g_trl,) = torch.autograd.grad(want.sum(), s_trl)
    s_kd = s.clone().requires_grad_()
    rows = kdfused_rows(s_kd, idx, lp, divergence="jsd", beta=beta, support="tail", T=1.0)
    (g,) = torch.autograd.grad(rows.sum(), s_kd)
    torch.testing.assert_close(rows, want, **TOL)
    torch.testing.assert_close(g, g_trl, **TOL)


@pytest.mark.parametrize("add_tail", [False, True], ids=["renormalized", "tail"])
def test_trl_batchmean_with_hard_term_and_ignored_rows(gen, add_tail):
    """TRL's reduction (the mean over the tokens whose label is not -100) is kdfused's
    reduction "mean" with soft_weight = 1 / T^2; the hard term adds the cross-entropy."""
    T = 2.0
    s, idx, lp = make_case(gen, 8, 40, 6, T)
    y = torch.randint(0, 40, (8,), generator=gen)
    y[[1, 5]] = -100
    keep = y != -100
    s_trl = s.clone().requires_grad_()
    trl = trl_rows(s_trl, idx, lp, beta=0.5, add_tail=add_tail, T=T)
    want = (trl[keep].sum() + 0.3 * F.cross_entropy(s_trl, y, reduction="sum")) / keep.sum()
    s_kd = s.clone().requires_grad_()
    got = ref_topk(
        s_kd, idx, lp, y, temperature=T, soft_weight=1 / T**2, hard_weight=0.3, divergence="jsd",
        support="tail" if add_tail else "renormalized", values="logprobs", reduction="mean",
    )  # fmt: skip
    torch.testing.assert_close(got, want, **TOL)
    (g,) = torch.autograd.grad(got, s_kd)
    (g_trl,) = torch.autograd.grad(want, s_trl)
    torch.testing.assert_close(g, g_trl, **TOL)
    assert (g[~keep] == 0).all()


# ---- support "full": the loss against a teacher masked outside its stored entries ---------


def full_teacher(idx, v, V, values, T):
    """A whole teacher row whose softmax at T is the stored teacher: -inf outside the valid
    entries (padding left out), and for log-probabilities v * T (so that v = t / T)."""
    valid = v > NEG_INF
    t = torch.full((idx.shape[0], V), NEG_INF, dtype=F64)
    stored = v * T if values == "logprobs" else v
    rows, cols = valid.nonzero(as_tuple=True)
    t[rows, idx[rows, cols]] = stored[rows, cols]
    return t


@pytest.mark.parametrize("values", ["logits", "logprobs"])
@pytest.mark.parametrize("divergence", ["kl", "ce"])
@pytest.mark.parametrize("T", [1.0, 2.5])
def test_full_support_is_kd_loss_with_a_masked_teacher(gen, values, divergence, T):
    s, idx, lp = make_case(gen, 6, 60, 9, T)
    v = lp * T if values == "logits" else lp  # logits whose softmax at T is the stored one
    y = torch.randint(0, 60, (6,), generator=gen)
    y[4] = -100
    kw = dict(temperature=T, soft_weight=0.8, hard_weight=0.2, divergence=divergence)
    s_kd = s.clone().requires_grad_()
    rows = ref_topk(s_kd, idx, v, y, values=values, reduction="none", **kw)
    (g,) = torch.autograd.grad(rows.sum(), s_kd)
    some = (lp > NEG_INF).any(-1)
    s_full = s.clone().requires_grad_()
    want = ref_kd_loss(s_full, full_teacher(idx, v, 60, values, T), y, reduction="none", **kw)
    (g_full,) = torch.autograd.grad(want[some].sum(), s_full)
    torch.testing.assert_close(rows[some], want[some], **TOL)
    torch.testing.assert_close(g[some], g_full[some], **TOL)
    # the padding-only row: only the hard term (kd_loss's teacher row has no distribution there)
    hard = 0.2 * F.cross_entropy(s[~some], y[~some], reduction="none")
    hard = torch.where(y[~some] == -100, 0.0, hard)
    torch.testing.assert_close(rows[~some], hard, **TOL)
