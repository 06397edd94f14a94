"""kdfused.linear_kd_loss / LinearKDLoss / torch.ops.kdfused.kd_linear_loss (CPU and CUDA).

Every value and gradient is compared with a float64 materialised reference on the CPU: F.linear in
float64 on the same (rounded) inputs, then kdfused.reference.kd_loss; gradients by autograd
through F.linear. Inputs are fresh random ones, drawn on the CPU and moved to the device; the seed
is KDFUSED_TEST_SEED or random, and printed (pytest -s, or in the failure message). The tests
that take the ``device`` fixture run on "cpu" and on "cuda" (skipped without a GPU).

Size: the linear op's whole contract (values, three gradients, chunks, options, errors).
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

import kdfused
from kdfused import reference

import linear_helpers as lin
from linear_helpers import F64, TOL, assert_close, f64, rnd
from linear_helpers import ctx as _ctx

pytestmark = pytest.mark.fused_only

print(f"test_linear: KDFUSED_TEST_SEED={lin.SEED}")
DIVS = ["kl", "ce", "reverse_kl", "jsd", "tvd"]
REDS = ["batchmean", "mean", "sum", "none"]


@pytest.fixture
def gen(request):
    return lin.generator(request.node.nodeid)


def make(
    gen,
    N,
    H,
    V,
    dtype,
    *,
    Ht=None,
    lead=None,
    bias=True,
    teacher="hidden",
    ignore_frac=0.3,
    labels=True,
    device="cpu",
    tdtype=None,
):
    """Random student/teacher layers on `device` (drawn on the CPU); the hidden states are scaled
    so logits are O(3). tdtype: the teacher's dtype (default: the student's)."""
    Ht = Ht or H
    tdtype = tdtype or dtype
    lead = lead or (N,)
    d = lin.student_layer(gen, lead, H, V, dtype, device, bias)
    if teacher == "hidden":
        d["teacher_hidden"] = rnd(gen, *lead, Ht, dtype=tdtype, device=device)
        d["teacher_weight"] = rnd(gen, V, Ht, dtype=tdtype, device=device, scale=3.0 / Ht**0.5)
        d["teacher_bias"] = rnd(gen, V, dtype=tdtype, device=device, scale=0.5) if bias else None
    else:
        d["teacher_logits"] = rnd(gen, *lead, V, dtype=tdtype, device=device, scale=3.0)
    d["labels"] = lin.random_labels(gen, lead, V, ignore_frac, device) if labels else None
    return d


def call(fn, d, **kw):
    return fn(
        d["student_hidden"],
        d["student_weight"],
        d.get("teacher_hidden"),
        d.get("teacher_weight"),
        d["labels"],
        student_bias=d["student_bias"],
        teacher_bias=d.get("teacher_bias"),
        teacher_logits=d.get("teacher_logits"),
        **kw,
    )


def reference_loss(d, grad_output=None, **kw):
    """(loss, grad_hidden, grad_weight, grad_bias), all float64 on the CPU, from materialised
    logits."""
    if d.get("teacher_logits") is not None:
        t = f64(d["teacher_logits"])
    else:
        t = F.linear(f64(d["teacher_hidden"]), f64(d["teacher_weight"]), f64(d.get("teacher_bias")))
    y = d["labels"].cpu() if d["labels"] is not None else None
    return lin.through_linear(d, lambda s: reference.kd_loss(s, t, y, **kw), grad_output)


def run_and_check(d, tol, ctx, grad_output=None, **kw):
    loss = call(kdfused.linear_kd_loss, d, **kw)
    ref = reference_loss(
        d, grad_output=grad_output, **{k: v for k, v in kw.items() if k != "chunk_size"}
    )
    return lin.backward_and_check(d, loss, ref, tol, ctx, grad_output)


@pytest.mark.parametrize("divergence", DIVS)
@pytest.mark.parametrize("reduction", REDS)
def test_every_divergence_and_reduction(gen, device, divergence, reduction):
    N, H, V = 13, 8, 37
    d = make(gen, N, H, V, F64, device=device)
    kw = lin.options(divergence, reduction=reduction, chunk_size=3)
    shape = (N,) if reduction == "none" else ()
    go = torch.rand(shape, generator=gen, dtype=F64) * 2 + 0.5  # grad_output != 1
    run_and_check(d, TOL[F64], _ctx(div=divergence, red=reduction), grad_output=go, **kw)


@pytest.mark.parametrize("chunk_size", [1, 3, 13, 40, None])
def test_chunk_boundaries(gen, device, chunk_size):
    N, H, V = 13, 6, 29
    d = make(gen, N, H, V, F64, device=device)
    run_and_check(
        d, TOL[F64], _ctx(chunk=chunk_size), temperature=1.5, hard_weight=0.5, chunk_size=chunk_size
    )


def test_loss_independent_of_chunk_size(gen, device):
    d = make(gen, 23, 16, 50, torch.float32, device=device)
    losses = [
        call(kdfused.linear_kd_loss, d, chunk_size=c, hard_weight=1.0).item()
        for c in (1, 4, 7, 23, 100)
    ]
    # Row losses are reduced in a fixed order in double; only the GEMMs' blocking may differ.
    assert max(losses) - min(losses) <= 1e-6 * abs(losses[0]), (losses, _ctx())


def test_whole_chunk_ignored(gen, device):
    N, H, V = 12, 5, 19
    d = make(gen, N, H, V, F64, ignore_frac=0.0, device=device)
    d["labels"][3:9] = -100  # chunks 1 and 2 of size 3: every row ignored
    loss = run_and_check(d, TOL[F64], _ctx(), hard_weight=0.5, chunk_size=3)
    assert torch.all(d["student_hidden"].grad[3:9] == 0)
    assert loss.item() != 0


def test_all_rows_ignored(gen, device):
    d = make(gen, 6, 4, 11, F64, ignore_frac=1.0, device=device)
    loss = call(kdfused.linear_kd_loss, d, hard_weight=1.0, chunk_size=2)
    loss.backward()
    assert loss.item() == 0.0
    for name in ("student_hidden", "student_weight", "student_bias"):
        assert torch.all(d[name].grad == 0), name


@pytest.mark.parametrize("dtype", [F64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("teacher", ["hidden", "logits"])
def test_dtypes_and_teacher_forms(gen, device, dtype, teacher):
    d = make(gen, 17, 24, 70, dtype, Ht=12, teacher=teacher, device=device)
    run_and_check(
        d,
        TOL[dtype],
        _ctx(dtype=dtype, teacher=teacher),
        temperature=2.0,
        soft_weight=0.8,
        hard_weight=0.2,
        chunk_size=5,
    )


def test_leading_dims_no_bias_no_labels(gen, device):
    d = make(gen, 0, 8, 21, F64, lead=(2, 5), bias=False, labels=False, device=device)
    run_and_check(d, TOL[F64], _ctx(), divergence="jsd", beta=0.6, chunk_size=4)
    run_and_check(
        make(gen, 0, 8, 21, F64, lead=(2, 5), bias=False, labels=False, device=device),
        TOL[F64],
        _ctx(),
        reduction="none",
        chunk_size=4,
        grad_output=torch.rand(2, 5, generator=gen, dtype=F64),
    )


def test_only_some_inputs_require_grad(gen, device):
    d = make(gen, 9, 4, 13, F64, device=device)
    d["student_weight"].requires_grad_(False)
    loss = call(kdfused.linear_kd_loss, d, chunk_size=2)
    loss.backward()
    ref = reference_loss(d)
    assert d["student_weight"].grad is None
    assert_close(d["student_hidden"].grad, ref[1], TOL[F64], "grad hidden")
    assert_close(d["student_bias"].grad, ref[3], TOL[F64], "grad bias")
    with torch.no_grad():
        loss2 = call(kdfused.linear_kd_loss, d, chunk_size=2)
    assert loss2.item() == loss.item()


@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_retain_graph(gen, device, reduction):
    d = make(gen, 10, 6, 17, F64, device=device)
    loss = call(kdfused.linear_kd_loss, d, hard_weight=0.3, reduction=reduction, chunk_size=4)
    shape = loss.shape
    gos = [
        torch.full(shape, 1.0, dtype=F64),
        torch.rand(shape, generator=gen, dtype=F64) + 0.5,
        torch.full(shape, -2.5, dtype=F64),
    ]
    for i, go in enumerate(gos):
        for name in ("student_hidden", "student_weight", "student_bias"):
            d[name].grad = None
        loss.backward(go.to(device), retain_graph=i + 1 < len(gos))
        ref = reference_loss(d, grad_output=go, hard_weight=0.3, reduction=reduction)
        for name, want in zip(("student_hidden", "student_weight", "student_bias"), ref[1:]):
            assert_close(d[name].grad, want, TOL[F64], f"{name} backward #{i} {_ctx()}")


def test_double_backward_refused(gen, device):
    d = make(gen, 5, 4, 9, F64, device=device)
    loss = call(kdfused.linear_kd_loss, d)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss, d["student_hidden"], create_graph=True)


def test_module(gen, device):
    d = make(gen, 8, 6, 15, F64, device=device)
    crit = kdfused.LinearKDLoss(temperature=3.0, hard_weight=0.5, divergence="tvd", chunk_size=3)
    got = call(crit, d)
    want = reference_loss(d, temperature=3.0, hard_weight=0.5, divergence="tvd")[0]
    assert_close(got, want, TOL[F64], "module loss")
    assert "chunk_size=3" in repr(crit)
    with pytest.raises(ValueError, match="chunk_size"):
        kdfused.LinearKDLoss(chunk_size=0)
    with pytest.raises(ValueError, match="temperature"):
        kdfused.LinearKDLoss(temperature=-1.0)


@pytest.mark.parametrize(
    "reduction,backend",
    [("batchmean", "inductor"), ("batchmean", "aot_eager"), ("none", "aot_eager")],
)
def test_torch_compile_fullgraph(gen, device, reduction, backend):
    d = make(gen, 11, 8, 23, torch.float32, device=device)

    def fn(sh, sw, sb, th, tw, tb, y):
        loss = kdfused.linear_kd_loss(
            sh,
            sw,
            th,
            tw,
            y,
            student_bias=sb,
            teacher_bias=tb,
            temperature=2.0,
            hard_weight=0.5,
            reduction=reduction,
            chunk_size=4,
        )
        return (loss * 3.0).sum()  # grad_output 3 reaches the op's backward

    args = [
        d[k]
        for k in (
            "student_hidden",
            "student_weight",
            "student_bias",
            "teacher_hidden",
            "teacher_weight",
            "teacher_bias",
            "labels",
        )
    ]
    torch._dynamo.reset()
    out = torch.compile(fn, fullgraph=True, backend=backend)(*args)
    out.backward()
    ref = reference_loss(
        d,
        grad_output=torch.full((11,) if reduction == "none" else (), 3.0),
        temperature=2.0,
        hard_weight=0.5,
        reduction=reduction,
    )
    want = ref[0].sum() * 3.0
    assert_close(out, want, TOL[torch.float32], "compiled loss")
    for name, w in zip(("student_hidden", "student_weight", "student_bias"), ref[1:]):
        assert_close(d[name].grad, w, TOL[torch.float32], f"compiled grad {name} {_ctx()}")


@pytest.mark.parametrize("case", ["grads", "nograd", "logits_none", "bf16"])
def test_opcheck(gen, device, case):
    dtype = torch.bfloat16 if case == "bf16" else F64
    d = make(
        gen, 7, 5, 11, dtype, teacher="logits" if case == "logits_none" else "hidden", device=device
    )
    red = "none" if case == "logits_none" else "batchmean"
    need = case != "nograd"
    if not need:
        for k in ("student_hidden", "student_weight", "student_bias"):
            d[k] = d[k].detach()
    args = (
        d["student_hidden"],
        d["student_weight"],
        d["student_bias"],
        d.get("teacher_hidden"),
        d.get("teacher_weight"),
        d.get("teacher_bias"),
        d.get("teacher_logits"),
        d["labels"],
        None,
        2.0,
        0.9,
        0.1,
        "kl",
        0.5,
        -100,
        red,
        (-1.5, 1.0, 3.0, 0.0) if case == "bf16" else (),  # logit_map: student softcap, scale
        case == "logits_none",  # return_entropy
        3,
        need,
        need,
        need,
    )
    torch.library.opcheck(torch.ops.kdfused.kd_linear_loss.default, args)


def _bad_cases(d):
    V, H = d["student_weight"].shape
    N = d["student_hidden"].shape[0]
    dev = d["student_hidden"].device
    f64 = dict(dtype=F64, device=dev)
    return [
        (dict(student_weight=torch.randn(V, H + 1, **f64)), ValueError, "H = "),
        (dict(student_weight=torch.randn(V, H, dtype=torch.float32)), TypeError, "one dtype"),
        (dict(student_bias=torch.randn(V + 1, **f64)), ValueError, "student_bias"),
        (
            dict(teacher_weight=torch.randn(V + 2, H, **f64), teacher_bias=None),
            ValueError,
            "teacher_weight has V",
        ),
        (dict(teacher_hidden=torch.randn(N + 1, H, **f64)), ValueError, "leading dims"),
        (dict(teacher_logits=torch.randn(N, V, **f64)), ValueError, "not both"),
        (
            dict(teacher_hidden=None, teacher_weight=None, teacher_bias=None),
            ValueError,
            "not neither",
        ),
        (dict(teacher_weight=None), ValueError, "teacher_weight is missing"),
        (dict(labels=torch.full((N,), V, device=dev)), ValueError, "labels must be in"),
        (
            dict(labels=torch.zeros(N + 1, dtype=torch.long, device=dev)),
            ValueError,
            "labels must have shape",
        ),
        (dict(labels=torch.zeros(N, device=dev)), TypeError, "labels must be int64"),
        (
            dict(student_hidden=torch.zeros(N, H, dtype=torch.long, device=dev)),
            TypeError,
            "student_hidden",
        ),
        (dict(student_hidden=[[1.0]]), TypeError, "student_hidden must be a tensor"),
        (dict(teacher_hidden=d["teacher_hidden"].clone().requires_grad_()), ValueError, "detach"),
    ]


@pytest.mark.parametrize("i", range(14))
def test_bad_inputs(gen, device, i):
    d = make(gen, 6, 4, 9, F64, device=device)
    change, exc, match = _bad_cases(d)[i]
    if device == "cuda" and match == "labels must be in":
        pytest.skip("label values are checked by the CUDA kernel: test_bad_label_cuda_assert")
    d.update(change)
    with pytest.raises(exc, match=match):
        call(kdfused.linear_kd_loss, d)


@pytest.mark.parametrize(
    "kw,exc,match",
    [
        (dict(chunk_size=0), ValueError, "chunk_size must be > 0"),
        (dict(chunk_size=-3), ValueError, "chunk_size must be > 0"),
        (dict(chunk_size=2.0), TypeError, "chunk_size must be an int"),
        (dict(temperature=0.0), ValueError, "temperature"),
        (dict(divergence="l2"), ValueError, "divergence"),
        (dict(reduction="avg"), ValueError, "reduction"),
    ],
)
def test_bad_options(gen, device, kw, exc, match):
    d = make(gen, 6, 4, 9, F64, device=device)
    with pytest.raises(exc, match=match):
        call(kdfused.linear_kd_loss, d, **kw)
    assert d["student_hidden"].grad is None


def test_deterministic_across_runs_and_threads(gen, device):
    d = make(gen, 300, 32, 500, torch.float32, device=device)
    results = []
    threads = torch.get_num_threads()
    try:
        for nt in (1, max(threads, 2), 1):
            torch.set_num_threads(nt)
            for name in ("student_hidden", "student_weight", "student_bias"):
                d[name].grad = None
            loss = call(kdfused.linear_kd_loss, d, hard_weight=0.5, chunk_size=37)
            loss.backward()
            results.append(
                [loss.detach()]
                + [d[k].grad.clone() for k in ("student_hidden", "student_weight", "student_bias")]
            )
    finally:
        torch.set_num_threads(threads)
    for r in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], r)), _ctx()


@pytest.mark.parametrize(
    "sdt,tdt",
    [
        (torch.float32, F64),
        (F64, torch.float32),
        (torch.bfloat16, torch.float32),
        (torch.float16, torch.bfloat16),
        (torch.float32, torch.float16),
    ],
    ids=["f32-f64", "f64-f32", "bf16-f32", "f16-bf16", "f32-f16"],
)
@pytest.mark.parametrize("teacher", ["hidden", "logits"])
def test_mixed_student_teacher_dtypes(gen, device, sdt, tdt, teacher):
    # On CUDA the pairs without a kernel (f16 x bf16, anything with f64) are converted per chunk.
    d = make(gen, 15, 12, 45, sdt, tdtype=tdt, teacher=teacher, device=device)
    tol = max(TOL[sdt], TOL[tdt])
    loss = run_and_check(
        d,
        tol,
        _ctx(sdt=sdt, tdt=tdt, teacher=teacher),
        grad_output=torch.tensor(1.5, dtype=F64),
        temperature=2.0,
        hard_weight=0.3,
        reduction="mean",
        chunk_size=4,
    )
    assert loss.dtype == (F64 if F64 in (sdt, tdt) else torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("divergence", ["kl", "jsd"])
@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_large_vocab(gen, device, dtype, divergence, reduction):
    # V > 2048: the CUDA kernel's per-CTA path; 3 chunks, the last one short.
    N, H, V = 40, 16, 5003
    d = make(gen, N, H, V, dtype, Ht=24, device=device, ignore_frac=0.5)
    shape = (N,) if reduction == "none" else ()
    go = torch.rand(shape, generator=gen, dtype=F64) + 0.5
    run_and_check(
        d,
        TOL[dtype],
        _ctx(dtype=dtype, div=divergence, red=reduction),
        grad_output=go,
        **lin.options(divergence, soft_weight=0.6, reduction=reduction, chunk_size=16),
    )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
@pytest.mark.parametrize("where", ["student_weight", "student_hidden", "labels", "teacher_logits"])
def test_device_mismatch_cuda(gen, where):
    d = make(gen, 6, 4, 9, F64, device="cuda", teacher="logits")
    d[where] = d[where].detach().cpu()
    with pytest.raises(ValueError, match="device"):
        call(kdfused.linear_kd_loss, d)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
def test_matches_cpu_cuda(gen):
    # The same inputs on both devices: the results agree to the GEMMs' rounding.
    d = make(gen, 33, 20, 3001, torch.float32, ignore_frac=0.4)
    dc = {
        k: (v.detach().cuda().requires_grad_(v.requires_grad) if v is not None else None)
        for k, v in d.items()
    }
    kw = dict(temperature=2.0, hard_weight=0.5, divergence="tvd", chunk_size=8)
    out = []
    for dd in (d, dc):
        loss = call(kdfused.linear_kd_loss, dd, **kw)
        loss.backward()
        out.append(
            [loss] + [dd[k].grad for k in ("student_hidden", "student_weight", "student_bias")]
        )
    for name, a, b in zip(("loss", "grad_hidden", "grad_weight", "grad_bias"), *out):
        assert_close(b, a.detach().to(F64), 1e-5, f"cuda vs cpu {name} {_ctx()}")


_BAD_LABEL_SCRIPT = r"""
import torch, kdfused
sh = torch.randn(6, 4, device="cuda", requires_grad=True)
sw = torch.randn(9, 4, device="cuda", requires_grad=True)
tl = torch.randn(6, 9, device="cuda")
y = torch.tensor([0, 1, 9, 2, -100, 3], device="cuda")  # 9 is out of [0, 9)
loss = kdfused.linear_kd_loss(sh, sw, labels=y, teacher_logits=tl, hard_weight=0.5, chunk_size=2)
torch.cuda.synchronize()
print("no error, loss", loss.item())
"""


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
def test_bad_label_cuda_assert():
    # On CUDA label values are checked by the fused kernel (a device-side assert, no host sync),
    # which leaves the CUDA context unusable: run in a process of its own.
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", _BAD_LABEL_SCRIPT], capture_output=True, text=True, timeout=300
    )
    text = out.stdout + out.stderr
    if out.returncode == 0 and "no error" in text:
        pytest.skip(f"this torch build has no CUDA kernel asserts ({text.strip()[-200:]})")
    assert out.returncode != 0 and "assert" in text.lower(), text[-2000:]


_MEMORY_SCRIPT = r"""
import torch, kdfused
N, H, V = 20000, 16, 5000   # N x V float32 logits would be 381 MiB
g = torch.Generator().manual_seed(0)
sh = torch.randn(N, H, generator=g).requires_grad_()
sw = (torch.randn(V, H, generator=g) / 4).requires_grad_()
th, tw = torch.randn(N, H, generator=g), torch.randn(V, H, generator=g) / 4
y = torch.randint(0, V, (N,), generator=g)
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
base = status("VmRSS")
open("/proc/self/clear_refs", "w").write("5")
loss = kdfused.linear_kd_loss(sh, sw, th, tw, y, hard_weight=0.5, chunk_size=64)
loss.backward()
print(status("VmHWM") - base)
"""


def test_peak_memory_is_per_chunk():
    import subprocess
    import sys

    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("needs Linux /proc/self/clear_refs to reset the peak RSS")
    out = subprocess.run(
        [sys.executable, "-c", _MEMORY_SCRIPT],
        capture_output=True,
        text=True,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert out.returncode == 0, out.stderr[-2000:]
    peak_mib = float(out.stdout.strip().splitlines()[-1])
    # Chunk buffers are 64 x 5000 floats (1.2 MiB); the gradients under 2 MiB; allow for the
    # allocator and BLAS workspaces, far below the 381 MiB of materialised logits.
    assert peak_mib < 64, f"peak {peak_mib:.1f} MiB above the inputs"
