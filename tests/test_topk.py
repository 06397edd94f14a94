"""kdfused.topk_kd_loss (distillation from a stored top-k teacher) against a float64 reference
(kdfused._reference_topk run in float64 with autograd), and against kdfused.kd_loss when k = V.

Inputs are random on every run: the module seed comes from $KDFUSED_TEST_SEED when set, else from
os.urandom, and is printed (each test mixes in its own name, also printed) so that a failure can
be reproduced with KDFUSED_TEST_SEED=<seed>.

Size: the top-k op's whole contract (values, gradient, dtypes, options, errors, compile).
"""

from __future__ import annotations

import math
import os
import zlib

import pytest
import torch

import kdfused
from kdfused import _C
from kdfused._reference_topk import topk_kd_loss as ref_topk_kd_loss

from topk_checks import check_against_ref, run_fused, run_ref, tolerances

SEED = int(os.environ.get("KDFUSED_TEST_SEED") or int.from_bytes(os.urandom(4), "little"))
print(f"test_topk: KDFUSED_TEST_SEED={SEED}")

_CUDA = torch.cuda.is_available()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not _CUDA, reason="no GPU"))]
FLOATS = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
ISAS = kdfused.build_info()["cpu_isa_compiled"]


@pytest.fixture
def gen(request) -> torch.Generator:
    seed = (SEED ^ zlib.crc32(request.node.nodeid.encode())) & 0x7FFFFFFF
    print(f"seed: KDFUSED_TEST_SEED={SEED}, test seed {seed}")
    return torch.Generator().manual_seed(seed)


def _poison(device: str) -> None:
    """Fill and free blocks with NaN, so that an output element the op forgets to write reads as
    NaN rather than as a lucky 0 (malloc / the CUDA caching allocator hand them back)."""
    sizes = [1 << 10, 1 << 14, 1 << 18, 1 << 20] if device == "cpu" else [1 << 26]
    blocks = [torch.full((n,), float("nan"), device=device) for n in sizes]
    del blocks


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    _poison(request.param)
    return request.param


def make_case(
    lead,
    V,
    k,
    gen,
    *,
    dtype=torch.float32,
    vdtype=None,
    idtype=torch.int64,
    device="cpu",
    scale=3.0,
    offset=0.0,
):
    """Student logits, a teacher's k entries (distinct random indices, values correlated with the
    student so that KL is neither 0 nor huge) and labels with some ignored rows."""
    vdtype = vdtype or dtype
    N = math.prod(lead)
    s = torch.randn(N, V, generator=gen, dtype=torch.float64) * scale + offset
    t = s + torch.randn(N, V, generator=gen, dtype=torch.float64) * scale
    idx = torch.rand(N, V, generator=gen).argsort(-1)[:, :k]
    vals = t.gather(1, idx)
    y = torch.randint(0, V, (N,), generator=gen)
    if N > 2:
        y[1] = -100
    return (
        s.reshape(*lead, V).to(dtype).to(device),
        idx.reshape(*lead, k).to(idtype).to(device),
        vals.reshape(*lead, k).to(vdtype).to(device),
        y.reshape(lead).to(device),
    )


# ---- semantics against the float64 reference ---------------------------------------------------


@pytest.mark.parametrize(
    "V,k",
    [
        (100, 1),
        (100, 5),
        (100, 64),
        (100, 100),
        (3000, 1),
        (3000, 5),
        (3000, 64),
        (3000, 3000),
        (4099, 64),
        (1, 1),
    ],
)
@pytest.mark.parametrize("divergence", ["kl", "ce"])
def test_k_values_against_reference(device, gen, V, k, divergence):
    s, idx, vals, y = make_case((2, 3), V, k, gen, device=device)
    check_against_ref(s, idx, vals, y, temperature=2.0, divergence=divergence)


@pytest.mark.skipif(not _CUDA, reason="no GPU")
@pytest.mark.parametrize("V", [392_000, 393_216])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_largest_duplicate_bitmap(gen, V, dtype):
    """The CTA kernel's duplicate-index bitmap at its largest (V up to 393216 = 48 KiB of bits, on
    top of the kernel's static shared memory: the launch needs the shared-memory opt-in) with the
    soft term on and k > 1: the CUDA result equals the CPU one within the dtype's tolerances."""
    s, idx, vals, y = make_case((3,), V, 64, gen, dtype=dtype)
    kw = dict(temperature=2.0, soft_weight=0.7, hard_weight=0.3)
    loss_c, grad_c = run_fused(s, idx, vals, y, **kw)
    loss_g, grad_g = run_fused(s.cuda(), idx.cuda(), vals.cuda(), y.cuda(), **kw)
    la, lr, ga, gr = tolerances(dtype, dtype, kw, V)
    torch.testing.assert_close(loss_g.cpu(), loss_c, atol=2 * la, rtol=2 * lr)
    torch.testing.assert_close(grad_g.cpu(), grad_c, atol=2 * ga, rtol=2 * gr)


@pytest.mark.parametrize("reduction", ["batchmean", "mean", "sum", "none"])
@pytest.mark.parametrize("sw,hw", [(1.0, 0.0), (0.7, 0.3), (0.0, 1.0), (0.0, 0.0)])
@pytest.mark.parametrize("T", [1.0, 2.0, 3.5])
def test_weights_reductions_hard_term(device, gen, reduction, sw, hw, T):
    s, idx, vals, y = make_case((7,), 2500, 16, gen, device=device)
    kw = dict(temperature=T, soft_weight=sw, hard_weight=hw, reduction=reduction)
    loss, grad = check_against_ref(s, idx, vals, y, **kw)
    if sw == 0 and hw == 0:
        assert (loss == 0).all() and (grad == 0).all()
    # ignored row (label -100): exactly 0 loss and 0 gradient
    assert (grad[1] == 0).all()
    if reduction == "none":
        assert loss.shape == (7,) and loss[1] == 0


@pytest.mark.parametrize("T", [0.05, 0.3, 1.0, 7.0, 100.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_temperatures(device, gen, T, dtype):
    s, idx, vals, y = make_case((5,), 3000, 64, gen, dtype=dtype, device=device)
    check_against_ref(s, idx, vals, y, temperature=T, soft_weight=0.8, hard_weight=0.2)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("vdtype", FLOATS)
@pytest.mark.parametrize("idtype", [torch.int64, torch.int32])
def test_dtypes_mixed(device, gen, dtype, vdtype, idtype):
    s, idx, vals, y = make_case(
        (4,), 2100, 20, gen, dtype=dtype, vdtype=vdtype, idtype=idtype, device=device
    )
    check_against_ref(
        s,
        idx,
        vals,
        y,
        temperature=2.0,
        soft_weight=0.9,
        hard_weight=0.1,
        divergence="ce" if vdtype == torch.float16 else "kl",
    )


def test_large_logit_offset_small_temperature(gen):
    """Shift invariance: logits around 1e4 at T = 0.05 lose nothing to cancellation."""
    s, idx, vals, y = make_case((4,), 1000, 8, gen, scale=0.02, offset=1e4)
    check_against_ref(s, idx, vals, y, temperature=0.05)


def test_masked_teacher_values(device, gen):
    s, idx, vals, y = make_case((6,), 500, 10, gen, device=device)
    vals[0, 3:] = float("-inf")  # entries without mass contribute nothing
    vals[2, :1] = float("-inf")
    check_against_ref(s, idx, vals, y, temperature=1.5, soft_weight=1.0, hard_weight=0.5)
    # No teacher distribution at all (padding only): no soft term, only the hard one, never NaN.
    vals[4, :] = float("-inf")
    idx[4, :] = idx[4, :1]  # padding entries' indices may repeat
    kw = dict(temperature=1.5, soft_weight=1.0, hard_weight=0.5, reduction="none")
    loss, grad = check_against_ref(s, idx, vals, y, **kw)
    hard = 0.5 * torch.nn.functional.cross_entropy(s[4:5].double().cpu(), y[4:5].cpu())
    torch.testing.assert_close(loss[4].double().cpu(), hard, rtol=1e-5, atol=1e-6)
    loss, grad = run_fused(s, idx, vals, y, temperature=1.5, reduction="none")
    assert loss[4] == 0 and (grad[4] == 0).all()


def test_masked_student_under_teacher_mass_is_inf(gen):
    s, idx, vals, y = make_case((3,), 300, 5, gen)
    s[0, idx[0, 2]] = float("-inf")
    loss, grad = run_fused(s, idx, vals, None, reduction="none")
    assert loss[0] == float("inf") and torch.isfinite(loss[1:]).all()
    assert torch.isfinite(grad).all()


# ---- k = V is kd_loss -------------------------------------------------------------------------


@pytest.mark.parametrize("divergence", ["kl", "ce"])
@pytest.mark.parametrize("V", [50, 2048, 5000])
def test_k_equals_V_matches_kd_loss(device, gen, divergence, V):
    N = 6
    s = (torch.randn(N, V, generator=gen) * 3).to(device)
    t = (torch.randn(N, V, generator=gen) * 3).to(device)
    y = torch.randint(0, V, (N,), generator=gen).to(device)
    y[2] = -100
    perm = torch.rand(N, V, generator=gen).argsort(-1).to(device)
    kw = dict(temperature=2.5, soft_weight=0.6, hard_weight=0.4, divergence=divergence)
    loss, grad = run_fused(s, perm, t.gather(1, perm), y, **kw)
    s2 = s.clone().requires_grad_()
    ref = kdfused.kd_loss(s2, t, y, **kw)
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(grad, s2.grad, rtol=2e-5, atol=2e-6)


# ---- every compiled CPU instruction set -----------------------------------------------------


@pytest.fixture
def isa(request):
    _C.set_cpu_isa(request.param)
    yield request.param
    _C.set_cpu_isa("auto")


@pytest.mark.parametrize("isa", ISAS, indirect=True)
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("V", [1, 17, 2049, 4099])
def test_every_cpu_isa(isa, gen, dtype, V):
    assert kdfused.build_info()["cpu_isa"] == isa
    for T, sw, hw in ((1.0, 0.7, 0.3), (2.0, 0.5, 0.5), (3.0, 0.9, 0.1)):
        s, idx, vals, y = make_case((5,), V, min(V, 7), gen, dtype=dtype)
        vals[0, 0] = float("-inf") if V > 1 else vals[0, 0]
        check_against_ref(s, idx, vals, y, temperature=T, soft_weight=sw, hard_weight=hw)


def test_isas_agree(gen):
    """The instruction sets differ only in rounding."""
    s, idx, vals, y = make_case((9,), 3000, 33, gen)
    outs = []
    for name in ISAS:
        _C.set_cpu_isa(name)
        try:
            outs.append(run_fused(s, idx, vals, y, temperature=2.0, hard_weight=0.3))
        finally:
            _C.set_cpu_isa("auto")
    for loss, grad in outs[1:]:
        torch.testing.assert_close(loss, outs[0][0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(grad, outs[0][1], rtol=1e-4, atol=1e-7)


# ---- gradients: poisoning, grad_output, retain_graph, no_grad ---------------------------------


def test_gradient_buffer_is_fully_written(gen):
    """A reused gradient buffer filled with NaN must come back fully overwritten (ignored rows,
    teacher positions, the label, the partial last vector of every chunk)."""
    s, idx, vals, y = make_case((9,), 120_007, 64, gen)  # 4.3 MB: the gradient cache keeps it
    kw = dict(temperature=2.0, soft_weight=0.9, hard_weight=0.1)
    loss, grad = run_fused(s, idx, vals, y, **kw)
    ptr = grad.data_ptr()
    grad.fill_(float("nan"))
    del grad
    loss2, grad2 = run_fused(s, idx, vals, y, **kw)
    if os.environ.get("KDFUSED_CPU_GRAD_CACHE", "1") != "0":
        assert grad2.data_ptr() == ptr, "the gradient cache did not hand the poisoned buffer back"
    assert not torch.isnan(grad2).any()
    assert (grad2[1] == 0).all()
    assert torch.equal(loss, loss2)
    _, rgrad = run_ref(s, idx, vals, y, **kw)
    torch.testing.assert_close(grad2.double(), rgrad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_grad_output_and_retain_graph(device, gen, reduction):
    s, idx, vals, y = make_case((5,), 700, 9, gen, device=device)
    kw = dict(temperature=2.0, soft_weight=0.8, hard_weight=0.2, reduction=reduction)
    s1 = s.clone().requires_grad_()
    loss = kdfused.topk_kd_loss(s1, idx, vals, y, **kw)
    s2 = s.double().requires_grad_()
    ref = ref_topk_kd_loss(s2, idx, vals.double(), y, **kw)
    for go in (torch.rand_like(loss) + 0.5, torch.full_like(loss, -2.0)):
        (g1,) = torch.autograd.grad(loss, s1, go, retain_graph=True)
        (g2,) = torch.autograd.grad(ref, s2, go.double(), retain_graph=True)
        torch.testing.assert_close(g1.double(), g2, rtol=1e-4, atol=1e-7)
    loss.backward(torch.ones_like(loss) * 3)
    (g2,) = torch.autograd.grad(ref, s2, torch.ones_like(ref) * 3)
    torch.testing.assert_close(s1.grad.double(), g2, rtol=1e-4, atol=1e-7)


def test_no_grad_and_detached(gen):
    s, idx, vals, y = make_case((4,), 300, 5, gen)
    with torch.no_grad():
        a = kdfused.topk_kd_loss(s.clone().requires_grad_(), idx, vals, y)
    b = kdfused.topk_kd_loss(s, idx, vals, y)
    assert not a.requires_grad and not b.requires_grad
    assert torch.equal(a, b)


def test_double_backward_refused(gen):
    s, idx, vals, y = make_case((3,), 100, 4, gen)
    s = s.requires_grad_()
    loss = kdfused.topk_kd_loss(s, idx, vals)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss, s, create_graph=True)


def test_deterministic_and_thread_count_independent(gen):
    s, idx, vals, y = make_case((33,), 5000, 64, gen)
    kw = dict(temperature=2.0, soft_weight=0.9, hard_weight=0.1)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        l1, g1 = run_fused(s, idx, vals, y, **kw)
        torch.set_num_threads(max(2, before))
        l2, g2 = run_fused(s, idx, vals, y, **kw)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(l1, l2) and torch.equal(g1, g2)


def test_inputs_not_modified_and_strided_student(gen):
    s, idx, vals, y = make_case((6,), 401, 7, gen)
    wide = torch.randn(6, 402, generator=gen)
    wide[:, :401] = s
    view = wide[:, :401]  # row-strided: read in place
    copies = [x.clone() for x in (wide, idx, vals, y)]
    check_against_ref(view, idx, vals, y, temperature=2.0, hard_weight=0.5)
    for a, b in zip((wide, idx, vals, y), copies):
        assert torch.equal(a, b)
    # a non-contiguous last dim (copied)
    st = s.t().contiguous().t()
    check_against_ref(st, idx, vals, y, temperature=2.0)


def test_module_matches_function(gen):
    s, idx, vals, y = make_case((2, 4), 300, 6, gen)
    kw = dict(temperature=3.0, soft_weight=0.8, hard_weight=0.2, divergence="ce", reduction="sum")
    crit = kdfused.TopKKDLoss(**kw)
    assert "divergence='ce'" in repr(crit)
    assert torch.equal(crit(s, idx, vals, y), kdfused.topk_kd_loss(s, idx, vals, y, **kw))
    with pytest.raises(ValueError, match="divergence must be one of"):
        kdfused.TopKKDLoss(divergence="js")
    with pytest.raises(ValueError, match="support='full' supports divergence 'kl' or 'ce'"):
        kdfused.TopKKDLoss(divergence="jsd")
    crit = kdfused.TopKKDLoss(2.0, 1.0, 0.0, "jsd", 0.3, "tail", "logprobs")  # positionally
    assert (crit.support, crit.values, crit.beta) == ("tail", "logprobs", 0.3)
    assert "support='tail'" in repr(crit) and "beta=0.3" in repr(crit)
    with pytest.raises(ValueError, match="needs values='logprobs'"):
        crit.values = "logits"
    assert crit.values == "logprobs"  # a refused change leaves the options as they were
    with pytest.raises(ValueError, match="temperature"):
        kdfused.TopKKDLoss(temperature=0.0)


# ---- bad input -------------------------------------------------------------------------------


def _bad(gen, device="cpu"):
    return make_case((4,), 50, 5, gen, device=device)


@pytest.mark.parametrize(
    "case,exc,match",
    [
        ("idx_range", ValueError, r"teacher_indices must be in \[0, 50\)"),
        ("idx_negative", ValueError, r"teacher_indices must be in"),
        ("idx_duplicate", ValueError, r"distinct"),
        ("k_gt_V", ValueError, r"k = 51"),
        ("k_zero", ValueError, r"k \(the last dim"),
        ("shape_values", ValueError, r"teacher_values must have the shape"),
        ("shape_indices", ValueError, r"teacher_indices must have shape"),
        ("idx_float", TypeError, r"teacher_indices must be int64 or int32"),
        ("values_int", TypeError, r"teacher_values must be float"),
        ("student_int", TypeError, r"student_logits must be float"),
        ("labels_range", ValueError, r"labels must be in \[0, 50\)"),
        ("labels_shape", ValueError, r"labels must have shape"),
        ("labels_float", TypeError, r"labels must be int64"),
        ("divergence", ValueError, r"divergence must be one of"),
        ("divergence_full", ValueError, r"support='full' supports divergence 'kl' or 'ce'"),
        ("reduction", ValueError, r"reduction must be"),
        ("temperature", ValueError, r"temperature must be finite and > 0"),
        ("hard_no_labels", ValueError, r"needs labels"),
        ("values_grad", ValueError, r"teacher_values must not require grad"),
        ("not_tensor", TypeError, r"must be a tensor"),
    ],
)
def test_bad_input(gen, case, exc, match):
    s, idx, vals, y = _bad(gen)
    kw = {}
    if case == "idx_range":
        idx[2, 3] = 50
    elif case == "idx_negative":
        idx[0, 0] = -1
    elif case == "idx_duplicate":
        idx[3, 4] = idx[3, 1]
    elif case == "k_gt_V":
        idx = torch.arange(51).expand(4, 51)
        vals = torch.zeros(4, 51)
    elif case == "k_zero":
        idx, vals = idx[:, :0], vals[:, :0]
    elif case == "shape_values":
        vals = vals[:, :4]
    elif case == "shape_indices":
        idx, vals = idx[:3], vals[:3]
    elif case == "idx_float":
        idx = idx.float()
    elif case == "values_int":
        vals = vals.long()
    elif case == "student_int":
        s = s.long()
    elif case == "labels_range":
        y[0] = 50
    elif case == "labels_shape":
        y = y[:3]
    elif case == "labels_float":
        y = y.float()
    elif case == "divergence":
        kw["divergence"] = "js"
    elif case == "divergence_full":
        kw["divergence"] = "jsd"
    elif case == "reduction":
        kw["reduction"] = "avg"
    elif case == "temperature":
        kw["temperature"] = float("nan")
    elif case == "hard_no_labels":
        y = None
        kw["hard_weight"] = 0.5
    elif case == "values_grad":
        vals = vals.requires_grad_()
    elif case == "not_tensor":
        vals = vals.tolist()
    s = s.requires_grad_(s.is_floating_point())
    with pytest.raises(exc, match=match):
        kdfused.topk_kd_loss(s, idx, vals, y, **kw)
    assert s.grad is None


def test_bad_indices_reported_at_first_bad_row(gen):
    s, idx, vals, y = make_case((64,), 80, 6, gen)
    idx[40, 2] = idx[40, 5]
    idx[50, 0] = 1000
    with pytest.raises(ValueError, match="row 40"):
        kdfused.topk_kd_loss(s, idx, vals, y)


# ---- custom op: opcheck, torch.compile ---------------------------------------------------------


@pytest.mark.parametrize(
    "reduction,labels,grad,dtype",
    [
        ("batchmean", True, True, torch.float32),
        ("none", True, True, torch.bfloat16),
        ("sum", False, True, torch.float64),
        ("mean", True, False, torch.float16),
    ],
)
def test_opcheck(device, gen, reduction, labels, grad, dtype):
    s, idx, vals, y = make_case((2, 3), 40, 6, gen, dtype=dtype, device=device)
    args = (
        s.requires_grad_(grad),
        idx,
        vals,
        y if labels else None,
        2.0,
        0.7,
        0.3 if labels else 0.0,
        "kl",
        0.5,  # beta
        -100,
        reduction,
        (0.7, 1.3, 5.0, 2.0) if reduction == "none" else (),  # logit_map
        "full",  # support
        "logits",  # values
        grad,
    )
    torch.library.opcheck(torch.ops.kdfused.topk_kd_loss, args)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(gen, backend):
    torch._dynamo.reset()
    s, idx, vals, y = make_case((3, 4), 300, 8, gen)
    kw = dict(temperature=2.0, soft_weight=0.9, hard_weight=0.1)

    def step(s, idx, vals, y):
        return kdfused.topk_kd_loss(s, idx, vals, y, **kw) * 2.0

    compiled = torch.compile(step, fullgraph=True, backend=backend)
    s1 = s.clone().requires_grad_()
    out = compiled(s1, idx, vals, y)
    out.backward()
    s2 = s.clone().requires_grad_()
    ref = step(s2, idx, vals, y)
    ref.backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(s1.grad, s2.grad)


def test_torch_compile_dynamic_shapes(gen):
    torch._dynamo.reset()

    def f(s, idx, vals, y):
        return kdfused.topk_kd_loss(
            s, idx, vals, y, temperature=1.5, hard_weight=0.5, reduction="none"
        ).sum()

    cf = torch.compile(f, fullgraph=True, backend="aot_eager", dynamic=True)
    for n in (4, 7):
        s, idx, vals, y = make_case((n,), 50, 5, gen, dtype=torch.float64)
        s1, s2 = s.clone().requires_grad_(), s.clone().requires_grad_()
        a, b = cf(s1, idx, vals, y), f(s2, idx, vals, y)
        a.backward()
        b.backward()
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(s1.grad, s2.grad, rtol=1e-12, atol=1e-14)


# ---- topk_teacher ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_topk_teacher(gen, dtype):
    t = (torch.randn(3, 5, 200, generator=gen) * 3).to(dtype)
    idx, vals = kdfused.topk_teacher(t, 12, rows_per_chunk=4)
    ridx = torch.topk(t, 12, dim=-1)
    assert idx.dtype == torch.int64 and vals.dtype == dtype
    assert idx.shape == (3, 5, 12) and vals.shape == (3, 5, 12)
    torch.testing.assert_close(vals, ridx.values, rtol=0, atol=0)
    assert torch.equal(t.gather(-1, idx), vals)
    # non-contiguous input, 1-D input
    tn = t.transpose(0, 1)
    idx_n, vals_n = kdfused.topk_teacher(tn, 3)
    assert torch.equal(tn.gather(-1, idx_n), vals_n)
    i1, v1 = kdfused.topk_teacher(t[0, 0], 200)
    assert torch.equal(i1.sort().values, torch.arange(200))
    with pytest.raises(ValueError, match="k must be in"):
        kdfused.topk_teacher(t, 201)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_topk_teacher_logprobs(gen, dtype):
    """values="logprobs": log_softmax(x / T) at the top-k of the logits, rows descending, in
    float32 (float64 for float64 logits) by default, chunk by chunk as one call."""
    t = (torch.randn(4, 3, 300, generator=gen) * 3).to(dtype)
    T = 1.7
    idx, lp = kdfused.topk_teacher(t, 16, rows_per_chunk=2, temperature=T, values="logprobs")
    assert idx.dtype == torch.int64 and lp.dtype == torch.float32
    assert torch.equal(idx, torch.topk(t, 16, dim=-1).indices)
    want = torch.log_softmax(t.double() / T, dim=-1).gather(-1, idx)
    # computed in float32 (rounded once more to the float32 output: |lp| < 40 here)
    torch.testing.assert_close(lp.double(), want, rtol=0, atol=5e-6)
    if dtype == torch.float64:  # computed in float64
        _, lp64 = kdfused.topk_teacher(t, 16, temperature=T, values="logprobs", value_dtype=dtype)
        torch.testing.assert_close(lp64, want, rtol=0, atol=1e-12)
    assert (lp.diff(dim=-1) <= 0).all()
    one, lp1 = kdfused.topk_teacher(t, 16, temperature=T, values="logprobs")  # one chunk
    assert torch.equal(one, idx) and torch.equal(lp1, lp)
    i32, v16 = kdfused.topk_teacher(
        t, 16, values="logprobs", index_dtype=torch.int32, value_dtype=torch.bfloat16
    )
    assert i32.dtype == torch.int32 and v16.dtype == torch.bfloat16
    i, v = kdfused.topk_teacher(t, 5, value_dtype=torch.float64)  # logits, another dtype
    assert v.dtype == torch.float64 and torch.equal(v, t.gather(-1, i).double())


@pytest.mark.parametrize(
    "kw,exc,match",
    [
        (dict(values="probs"), ValueError, "values must be 'logits' or 'logprobs'"),
        (dict(temperature=2.0), ValueError, "temperature is for values='logprobs'"),
        (dict(temperature=0.0, values="logprobs"), ValueError, "temperature must be finite"),
        (dict(index_dtype=torch.int16), TypeError, "index_dtype"),
        (dict(value_dtype=torch.int32), TypeError, "value_dtype"),
    ],
)
def test_topk_teacher_bad_arguments(gen, kw, exc, match):
    with pytest.raises(exc, match=match):
        kdfused.topk_teacher(torch.randn(2, 10, generator=gen), 3, **kw)


def test_topk_teacher_round_trip_equals_full_kd_loss(gen):
    """Storing all V entries with topk_teacher loses nothing: the loss is kd_loss's."""
    s = torch.randn(4, 64, generator=gen) * 2
    t = torch.randn(4, 64, generator=gen) * 2
    idx, vals = kdfused.topk_teacher(t, 64)
    a = kdfused.topk_kd_loss(s, idx.int(), vals, temperature=2.0)
    b = kdfused.kd_loss(s, t, temperature=2.0)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_fake_kernel_checks_shapes(gen):
    """Under torch.compile the fake kernel sees bad shapes first: the same errors."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    s, idx, vals, y = make_case((4,), 50, 5, gen)
    short = vals[:, :4].contiguous()
    with FakeTensorMode() as mode:
        fs, fi = mode.from_tensor(s), mode.from_tensor(idx)
        fv = mode.from_tensor(vals)
        loss, gs, scale = torch.ops.kdfused.topk_kd_loss(
            fs, fi, fv, None, 2.0, 1.0, 0.0, "kl", 0.5, -100, "none", (), "full", "logits", True
        )
        assert loss.shape == (4,) and gs.shape == s.shape and scale.shape == (4,)
        with pytest.raises(ValueError, match="teacher_values must have the shape"):
            torch.ops.kdfused.topk_kd_loss(
                fs, fi, mode.from_tensor(short), None, 1.0, 1.0, 0.0, "kl", 0.5, -100, "batchmean",
                (), "full", "logits", False,
            )  # fmt: skip
        with pytest.raises(ValueError, match="'kl' or 'ce'"):
            torch.ops.kdfused.topk_kd_loss(
                fs, fi, fv, None, 1.0, 1.0, 0.0, "jsd", 0.5, -100, "batchmean", (), "full",
                "logits", False,
            )  # fmt: skip
