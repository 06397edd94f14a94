"""kdfused.integrations.trl.chunked_divergence_loss against TRL's _chunked_divergence_loss.

The reference is the real trl package (pinned in requirements-dev.txt), whose function runs on
the CPU in plain PyTorch (its Triton kernels are for CUDA). Loss, entropy sum, valid count and the
gradients of the student's hidden states, weight and bias are compared for beta 0, 1 and in
between, temperatures 1 and not 1, the logit scale and softcap on each side, masks with some
tokens masked, num_items_in_batch None / int / tensor, with and without biases, float32 and
float64. Inputs are fresh random ones from the suite's per-test seed (printed with a failure).
TRL's vocabulary tile is narrowed to 64 columns, so that its tiling is exercised (V = 97).

TRL computes in float32 whatever the inputs, so in float64 it is also run with its float32
accumulators promoted to float64 (``_trl_in_float64``: its own code, the dtype of its buffers
and projections changed), and kdfused is compared with that to 1e-10. Its backward rounds the
incoming gradient (1 / count per token) to float32, so there the counts are powers of two, whose
inverses float32 holds exactly.

Also: the teacher gets no gradient, no valid token, chunk sizes, bfloat16, autocast, the arguments
kdfused rejects, patch_distillation_trainer, the ImportError raised when trl is missing (simulated)
by patch_distillation_trainer and DistillationTrainer, and that the loss itself works without it.
The DistillationTrainer subclass in training: tests/test_integration_trl_trainer.py.
"""

from __future__ import annotations

import contextlib
import importlib
import sys

import pytest
import torch
import trl  # a requirement of this file (pinned in requirements-dev.txt), not skipped
import trl.kernels.chunked_divergence as trl_kernels
import trl.trainer.distillation_trainer as trl_trainer

from kdfused.integrations.trl import TRL_VERSION, chunked_divergence_loss

pytestmark = pytest.mark.fused_only

B, K, H, HT, V = 3, 16, 24, 40, 97  # N = 48 rows

# (student scale, student softcap, teacher scale, teacher softcap)
TRANSFORMS = {
    "plain": (1.0, None, 1.0, None),
    "student": (0.7, 3.0, 1.0, None),
    "teacher": (1.0, None, 1.3, 2.5),
    "both": (1.6, 4.0, 0.6, 2.0),
}


@pytest.fixture(autouse=True)
def _narrow_trl_tiles(monkeypatch):
    """TRL's vocabulary tile narrowed from 32768 columns to 64: its online logsumexp then crosses
    tiles (V = 97), and its (rows x tile) buffers stay small."""
    monkeypatch.setattr(trl_kernels, "VOCAB_CHUNK_SIZE", 64)


def _inputs(gen, dtype, *, bias, n_valid=None, shape=(B, K), h=H, ht=HT, v=V):
    def r(*size, scale=1.0):
        return (torch.randn(*size, generator=gen, dtype=torch.float64) * scale).to(dtype)

    n = shape[0] * shape[1]
    if n_valid is None:
        n_valid = int(torch.randint(1, n, (), generator=gen))
    mask = torch.zeros(n, dtype=torch.int64)
    mask[torch.randperm(n, generator=gen)[:n_valid]] = 1
    return dict(
        student_hidden_states=r(*shape, h),
        teacher_hidden_states=r(*shape, ht),
        student_lm_head_weight=r(v, h, scale=3.0 / h**0.5),
        teacher_lm_head_weight=r(v, ht, scale=3.0 / ht**0.5),
        completion_mask=mask.reshape(shape),
        student_lm_head_bias=r(v, scale=0.5) if bias else None,
        teacher_lm_head_bias=r(v, scale=0.5) if bias else None,
    )


def _run(fn, args, grad_scale=None, **kw):
    """(loss, entropy_sum, n_valid) and the student's gradients, each student input a fresh leaf."""
    args = dict(args)
    leaves = []
    for name in ("student_hidden_states", "student_lm_head_weight", "student_lm_head_bias"):
        if args[name] is not None:
            args[name] = args[name].clone().requires_grad_()
        leaves.append(args[name])
    loss, entropy_sum, n_valid = fn(**args, **kw)
    (loss if grad_scale is None else loss * grad_scale).backward()
    grads = [x.grad if x is not None else None for x in leaves]
    return (loss.detach(), entropy_sum, n_valid), grads


def _close(x, y, rtol, what):
    x, y = x.double(), y.double()
    tol = rtol * max(1.0, y.abs().max().item())
    err = (x - y).abs().max().item()
    assert err <= tol, f"{what}: max abs diff {err:.3g} > {tol:.3g}"


def _compare(ours, theirs, rtol, seed):
    (v1, g1), (v2, g2) = ours, theirs
    for name, x, y in zip(("loss", "entropy_sum"), v1, v2):
        assert x.shape == () and not x.requires_grad, name
        _close(x, y, rtol, f"{name} (seed {seed})")
    assert v1[2].dtype == v2[2].dtype == torch.int64 and int(v1[2]) == int(v2[2])
    for name, x, y in zip(("grad hidden", "grad weight", "grad bias"), g1, g2):
        assert (x is None) == (y is None), name
        if x is not None:
            assert x.dtype == y.dtype, name
            _close(x, y, rtol, f"{name} (seed {seed})")


class _Float64Torch:
    """``torch`` as TRL's kernel module sees it, with ``torch.float32`` being float64."""

    def __getattr__(self, name):
        return torch.float64 if name == "float32" else getattr(torch, name)


def _project64(tile, hidden_chunk, weight, bias, start, end, dtype):
    torch.mm(hidden_chunk.double(), weight[start:end].double().t(), out=tile)
    if bias is not None:
        tile.add_(bias[start:end].double())


def _addmm64(acc, a, b):
    acc.addmm_(a.double(), b.double())


@contextlib.contextmanager
def _trl_in_float64():
    """TRL's own loss with its float32 buffers, projections and gradient sums in float64."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(trl_kernels, "torch", _Float64Torch())
        mp.setattr(trl_kernels, "_project", _project64)
        mp.setattr(trl_kernels, "_addmm_fp32", _addmm64)
        yield


def _kwargs(beta, temperature, transform, num_items):
    ss, sc, ts, tc = TRANSFORMS[transform]
    return dict(
        beta=beta,
        num_items_in_batch=num_items,
        student_logit_scale=ss,
        teacher_logit_scale=ts,
        student_final_logit_softcapping=sc,
        teacher_final_logit_softcapping=tc,
        temperature=temperature,
    )


def _against_trl(betas, temperatures):
    """Parametrizes a comparison with TRL over beta, temperature, every transform, the three
    forms of num_items_in_batch and with / without the lm_head biases."""
    axes = {
        "beta": betas,
        "temperature": temperatures,
        "transform": list(TRANSFORMS),
        "num_items": [None, "int", "tensor"],
        "bias": [False, True],
    }

    def parametrize(test):
        for name in reversed(axes):  # as stacked decorators: the last one applies first
            test = pytest.mark.parametrize(name, axes[name])(test)
        return test

    return parametrize


def test_trl_version():
    from importlib.metadata import version

    assert version("trl") == TRL_VERSION == trl.__version__


@_against_trl(betas=[0.0, 0.35, 1.0], temperatures=[1.0, 1.7])
def test_matches_trl_float64(gen, seed, beta, temperature, transform, num_items, bias):
    args = _inputs(gen, torch.float64, bias=bias, n_valid=32)
    num = {None: None, "int": 64, "tensor": torch.tensor(128)}[num_items]
    kw = _kwargs(beta, temperature, transform, num)
    ours = _run(chunked_divergence_loss, args, **kw)
    assert ours[0][0].dtype == torch.float64
    with _trl_in_float64():
        exact = _run(trl_trainer._chunked_divergence_loss, args, **kw)
    _compare(ours, exact, 1e-10, seed)
    # the real function, unchanged, computes in float32
    _compare(ours, _run(trl_trainer._chunked_divergence_loss, args, **kw), 1e-5, seed)


@_against_trl(betas=[0.0, 0.6, 1.0], temperatures=[1.0, 0.8])
def test_matches_trl_float32(gen, seed, beta, temperature, transform, num_items, bias):
    args = _inputs(gen, torch.float32, bias=bias)
    n = int(args["completion_mask"].count_nonzero())
    num = {None: None, "int": n + 13, "tensor": torch.tensor(float(2 * n + 1))}[num_items]
    kw = _kwargs(beta, temperature, transform, num)
    ours = _run(chunked_divergence_loss, args, grad_scale=1.3, **kw)
    theirs = _run(trl_trainer._chunked_divergence_loss, args, grad_scale=1.3, **kw)
    assert ours[0][0].dtype == theirs[0][0].dtype == torch.float32
    _compare(ours, theirs, 1e-5, seed)


def test_shapes_and_bool_mask(gen, seed):
    """Any leading shape, a bool mask, a teacher of another width, a single valid token."""
    args = _inputs(gen, torch.float64, bias=True, n_valid=1, shape=(2, 5), h=8, ht=3, v=33)
    args["completion_mask"] = args["completion_mask"].bool()
    kw = _kwargs(0.5, 2.0, "both", None)
    with _trl_in_float64():
        exact = _run(trl_trainer._chunked_divergence_loss, args, **kw)
    _compare(_run(chunked_divergence_loss, args, **kw), exact, 1e-10, seed)


def test_no_valid_token(gen, seed):
    args = _inputs(gen, torch.float32, bias=True)
    args["completion_mask"].zero_()
    for num in (None, 7):
        kw = _kwargs(0.5, 1.5, "both", num)
        ours = _run(chunked_divergence_loss, args, **kw)
        _compare(ours, _run(trl_trainer._chunked_divergence_loss, args, **kw), 0.0, seed)
        assert ours[0][0].item() == 0.0 and ours[0][1].item() == 0.0 and int(ours[0][2]) == 0
        assert all(torch.count_nonzero(g) == 0 for g in ours[1])


def test_teacher_gets_no_gradient(gen, seed):
    args = _inputs(gen, torch.float32, bias=True)
    kw = _kwargs(0.5, 1.0, "plain", None)
    results = []
    for fn in (chunked_divergence_loss, trl_trainer._chunked_divergence_loss):
        teacher = {}
        for name in ("teacher_hidden_states", "teacher_lm_head_weight", "teacher_lm_head_bias"):
            teacher[name] = args[name].clone().requires_grad_()
        results.append(_run(fn, {**args, **teacher}, **kw))
        assert all(t.grad is None for t in teacher.values())
    _compare(*results, 1e-5, seed)


def test_student_without_grad(gen, seed):
    """Only the tensors that require grad get one (here the weight alone)."""
    args = _inputs(gen, torch.float64, bias=True, n_valid=16)
    kw = _kwargs(0.35, 1.0, "student", 16)
    grads = []
    for fn in (chunked_divergence_loss, trl_trainer._chunked_divergence_loss):
        w = args["student_lm_head_weight"].clone().requires_grad_()
        with _trl_in_float64():
            loss, _, _ = fn(**{**args, "student_lm_head_weight": w}, **kw)
            loss.backward()  # TRL's backward runs its kernels again
        grads.append(w.grad)
    _close(grads[0], grads[1], 1e-10, f"grad weight (seed {seed})")


def test_chunk_size_independent(gen, seed):
    args = _inputs(gen, torch.float64, bias=True, n_valid=32)
    kw = _kwargs(0.35, 1.7, "both", None)
    with _trl_in_float64():
        exact = _run(trl_trainer._chunked_divergence_loss, args, **kw)
    for chunk in (None, 1, 7, 1024):
        _compare(_run(chunked_divergence_loss, args, chunk_size=chunk, **kw), exact, 1e-10, seed)


def test_bfloat16(gen, seed):
    """bfloat16: TRL projects in float32 on the CPU; the two agree to bfloat16's rounding."""
    args = _inputs(gen, torch.bfloat16, bias=True)
    kw = _kwargs(0.5, 2.0, "both", None)
    ours = _run(chunked_divergence_loss, args, **kw)
    assert ours[0][0].dtype == torch.float32
    _compare(ours, _run(trl_trainer._chunked_divergence_loss, args, **kw), 3e-2, seed)


def test_autocast(gen, seed):
    """Under autocast both project in its dtype (bfloat16), from float32 tensors."""
    args = _inputs(gen, torch.float32, bias=True)
    kw = _kwargs(0.5, 2.0, "both", None)
    results = []
    for fn in (chunked_divergence_loss, trl_trainer._chunked_divergence_loss):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            results.append(_run(fn, args, **kw))
    assert results[0][0][0].dtype == torch.float32
    _compare(*results, 2e-2, seed)


def test_bad_arguments(gen):
    args = _inputs(gen, torch.float32, bias=False)
    for bad in (0.0, -1.0, float("inf"), float("nan"), 1e-200):
        with pytest.raises(ValueError, match="temperature"):
            chunked_divergence_loss(**args, beta=0.5, temperature=bad)
    with pytest.raises(ValueError, match="beta"):
        chunked_divergence_loss(**args, beta=1.5)
    with pytest.raises(ValueError, match="softcap"):
        chunked_divergence_loss(**args, beta=0.5, student_final_logit_softcapping=0.0)
    with pytest.raises(ValueError, match="completion_mask"):
        chunked_divergence_loss(
            **{**args, "completion_mask": args["completion_mask"][:, 1:]}, beta=0
        )


def test_patch_distillation_trainer(monkeypatch):
    from kdfused.integrations import trl as ours

    original = trl_trainer._chunked_divergence_loss
    monkeypatch.setattr(trl_trainer, "_chunked_divergence_loss", original)
    monkeypatch.setattr(ours, "_ORIGINAL", None)
    assert ours.patch_distillation_trainer() is original
    assert trl_trainer._chunked_divergence_loss is chunked_divergence_loss
    assert ours.patch_distillation_trainer() is original  # a second call changes nothing
    assert trl_trainer._chunked_divergence_loss is chunked_divergence_loss


def _hide(monkeypatch):
    """Makes `import trl` fail as for a package that is not installed."""
    for name in list(sys.modules):
        if name == "trl" or name.startswith("trl."):
            monkeypatch.delitem(sys.modules, name)
    for name in ("trl", "trl.trainer", "trl.trainer.distillation_trainer"):
        monkeypatch.setitem(sys.modules, name, None)


def _fresh_module(monkeypatch):
    import kdfused
    import kdfused.integrations

    # the fresh imports below rebind these attributes; monkeypatch puts the originals back
    monkeypatch.setattr(kdfused, "integrations", kdfused.integrations)
    monkeypatch.setattr(kdfused.integrations, "trl", sys.modules["kdfused.integrations.trl"])
    for name in ("kdfused.integrations", "kdfused.integrations.trl"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    return importlib.import_module("kdfused.integrations.trl")


def test_missing_trl_import_error(monkeypatch):
    _hide(monkeypatch)
    mod = _fresh_module(monkeypatch)
    with pytest.raises(ImportError) as info:
        mod.patch_distillation_trainer()
    msg = str(info.value)
    assert "'trl'" in msg and f"pip install trl=={TRL_VERSION}" in msg, msg
    assert "patch_distillation_trainer" in msg, msg
    assert isinstance(info.value.__cause__, ImportError)


def test_missing_trl_trainer_import_error(monkeypatch):
    """DistillationTrainer (a subclass of trl's, built on first access) raises the same error."""
    _hide(monkeypatch)
    mod = _fresh_module(monkeypatch)
    for _ in range(2):  # nothing cached by a failed access
        with pytest.raises(ImportError) as info:
            _ = mod.DistillationTrainer
        msg = str(info.value)
        assert f"pip install trl=={TRL_VERSION}" in msg and "DistillationTrainer" in msg, msg
    assert "DistillationTrainer" not in vars(mod)
    namespace = {}
    exec("from kdfused.integrations.trl import *", namespace)  # a star import needs no trl
    assert "chunked_divergence_loss" in namespace and "DistillationTrainer" not in namespace
    with pytest.raises(AttributeError):
        _ = mod.NoSuchName


def test_module_works_without_trl(monkeypatch, gen):
    """The integration module imports, and computes, with trl missing."""
    _hide(monkeypatch)
    mod = _fresh_module(monkeypatch)
    assert "trl" not in {k.split(".")[0] for k, v in sys.modules.items() if v is not None}
    loss, entropy_sum, n_valid = mod.chunked_divergence_loss(
        **_inputs(gen, torch.float32, bias=True), beta=0.5
    )
    assert torch.isfinite(loss) and torch.isfinite(entropy_sum) and int(n_valid) > 0
    assert importlib.import_module("kdfused.integrations").trl is mod


def test_fsdp2_dtensor_head(gen, seed, tmp_path):
    """An FSDP2 lm-head (a DTensor sharded over the vocabulary, on a 1-process gloo mesh) is
    gathered once, as TRL does: the same loss, and the weight's gradient arrives as a DTensor
    equal to the plain one."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    args = _inputs(gen, torch.float64, bias=True)
    kw = _kwargs(0.5, 2.0, "both", None)
    plain = _run(chunked_divergence_loss, args, **kw)
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group(
        "gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1
    )
    try:
        mesh = init_device_mesh("cpu", (1,))
        sharded = dict(args)
        for side in ("student", "teacher"):
            for part in ("weight", "bias"):
                name = f"{side}_lm_head_{part}"
                sharded[name] = distribute_tensor(args[name], mesh, [Shard(0)])
        sharded["student_lm_head_weight"].requires_grad_()
        loss, entropy_sum, n_valid = chunked_divergence_loss(**sharded, **kw)
        loss.backward()
        grad = sharded["student_lm_head_weight"].grad
    finally:
        dist.destroy_process_group()
    assert isinstance(grad, DTensor)
    _close(loss.detach(), plain[0][0], 1e-12, f"loss (seed {seed})")
    _close(entropy_sum, plain[0][1], 1e-12, f"entropy_sum (seed {seed})")
    assert int(n_valid) == int(plain[0][2])
    _close(grad.full_tensor(), plain[1][1], 1e-12, f"grad weight (seed {seed})")
