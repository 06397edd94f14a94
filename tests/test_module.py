"""kdfused.KDLoss (the nn.Module) and kdfused.reference.kd_loss (the pure-PyTorch specification),
both against the independent float64 oracle, plus the public API surface."""

from __future__ import annotations

import inspect
import math

import pytest
import torch

from oracle import DTYPE_IDS, check_against_oracle, make_labels, make_logits
from params import REDUCTIONS
from params import ctx as _ctx

# ------------------------------------------------------------------------------------------------
# kdfused.reference vs the oracle (runs whatever --kd-impl says: it is about the reference)
# ------------------------------------------------------------------------------------------------


def _reference():
    from kdfused import reference

    return reference.kd_loss


@pytest.mark.parametrize(
    "dtype", [torch.bfloat16, torch.float32, torch.float64], ids=lambda d: DTYPE_IDS[d]
)
@pytest.mark.parametrize("temperature", [0.5, 4.0])
@pytest.mark.parametrize("weights", [(1.0, 0.0), (0.9, 0.1), (0.0, 1.0)], ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("divergence", ["kl", "ce"])
def test_reference_vs_oracle(device, gen, seed, divergence, reduction, weights, temperature, dtype):
    s = make_logits((3, 4, 45), dtype, device, gen)
    t = make_logits((3, 4, 45), dtype, device, gen)
    labels = make_labels((3, 4), 45, device, gen, 0.25)
    kw = dict(
        temperature=temperature,
        soft_weight=weights[0],
        hard_weight=weights[1],
        divergence=divergence,
        reduction=reduction,
    )
    check_against_oracle(_reference(), s, t, labels, grad_teacher=True, ctx=_ctx(seed, **kw), **kw)


def test_reference_masked_vs_oracle(device, gen, seed):
    s = make_logits((4, 30), torch.float32, device, gen)
    t = make_logits((4, 30), torch.float32, device, gen)
    s[:, :5] = float("-inf")
    t[:, :5] = float("-inf")
    t[:, 5:9] = float("-inf")
    for divergence in ["kl", "ce"]:
        check_against_oracle(
            _reference(),
            s,
            t,
            None,
            grad_teacher=True,
            temperature=2.0,
            divergence=divergence,
            reduction="none",
            ctx=_ctx(seed),
        )


# ------------------------------------------------------------------------------------------------
# public API
# ------------------------------------------------------------------------------------------------


@pytest.mark.fused_only
def test_public_api(kdfused_mod):
    """Every name in kdfused.__all__ resolves (the fused ones load the extension lazily)."""
    for name in kdfused_mod.__all__:
        assert getattr(kdfused_mod, name) is not None, name
    assert issubclass(kdfused_mod.KDLoss, torch.nn.Module)
    assert issubclass(kdfused_mod.KDLossFunction, torch.autograd.Function)
    assert set(kdfused_mod.build_info()) >= {"cuda", "cpu_isa", "cpu_isa_compiled"}


@pytest.mark.fused_only
def test_signature_matches_reference(kdfused_mod):
    """kd_loss and reference.kd_loss: the same parameters, kinds and defaults (the logit
    transforms and return_entropy included)."""
    a = inspect.signature(kdfused_mod.kd_loss).parameters
    b = inspect.signature(kdfused_mod.reference.kd_loss).parameters
    assert [(p.name, p.kind, p.default) for p in a.values()] == [
        (p.name, p.kind, p.default) for p in b.values()
    ]
    expected = dict(
        labels=None,
        temperature=1.0,
        soft_weight=1.0,
        hard_weight=0.0,
        divergence="kl",
        beta=0.5,
        ignore_index=-100,
        reduction="batchmean",
    )
    for name, default in expected.items():
        assert a[name].default == default, name
    for name in list(expected)[1:]:
        assert a[name].kind is inspect.Parameter.KEYWORD_ONLY, name


@pytest.mark.fused_only
@pytest.mark.parametrize(
    "op, module, reference",
    [
        ("kd_loss", "KDLoss", "kd_loss"),
        ("linear_kd_loss", "LinearKDLoss", None),
        ("topk_kd_loss", "TopKKDLoss", "topk_kd_loss"),
        ("linear_topk_kd_loss", "LinearTopKKDLoss", None),
    ],
)
def test_loss_options_agree_everywhere(kdfused_mod, op, module, reference):
    """Each public op takes the loss options as ``**options`` and shows them in its signature
    (``_options.takes_options``, from KDOptions): every option is keyword-only, with KDOptions'
    default, in KDOptions' order; the module takes the same options with the same defaults in the
    same order (its positional order); the reference, where there is one, has the op's signature
    exactly; a keyword that is not an option raises Python's TypeError, naming the op."""
    import dataclasses

    from kdfused._options import KDOptions

    fields = [f for f in dataclasses.fields(KDOptions) if f.init]
    params = inspect.signature(getattr(kdfused_mod, op)).parameters
    taken = [f for f in fields if f.name in params]
    assert [f.name for f in taken] == [f.name for f in fields]  # every op takes all of them
    for f in taken:
        assert params[f.name].kind is inspect.Parameter.KEYWORD_ONLY, (op, f.name)
        assert params[f.name].default == f.default, (op, f.name)
    order = [n for n in params if n in {f.name for f in fields}]
    assert order == [f.name for f in fields], op

    mod_params = inspect.signature(getattr(kdfused_mod, module)).parameters
    keyword_only = [p for p in params.values() if p.kind is inspect.Parameter.KEYWORD_ONLY]
    expected = [(p.name, p.default) for p in keyword_only if p.name in mod_params]
    assert [(p.name, p.default) for p in mod_params.values()] == expected, module
    assert {f.name for f in fields} <= set(mod_params), module

    functions = [getattr(kdfused_mod, op)]
    if reference is not None:
        functions.append(getattr(kdfused_mod.reference, reference))
        ref = inspect.signature(functions[-1]).parameters
        assert [(p.name, p.kind, p.default) for p in ref.values()] == [
            (p.name, p.kind, p.default) for p in params.values()
        ], reference
    required = [p for p in params.values() if p.default is inspect.Parameter.empty]
    tensors = [torch.ones(2, 3)] * len(required)  # (the type checks come first)
    for function in functions:
        with pytest.raises(
            TypeError, match=rf"^{op}\(\) got an unexpected keyword argument 'temprature'$"
        ):
            function(*tensors, temprature=2.0)


def test_typed_options_match_kdoptions():
    """The TypedDicts that type checkers read for ``**options`` name KDOptions' fields, in order,
    with the same types; the top-k ones add support and values, whose defaults TopKOptions
    shares."""
    import dataclasses
    import typing

    from kdfused import _options
    from kdfused._options import KDOptions, LossOptions, TopKLossOptions
    from kdfused.topk import TopKOptions

    fields = [f for f in dataclasses.fields(KDOptions) if f.init]
    hints = typing.get_type_hints(LossOptions)
    assert list(hints) == [f.name for f in fields]
    namespace = vars(_options)
    for f in fields:
        assert hints[f.name] == eval(f.type, namespace), f.name  # (annotations are strings there)
    topk = typing.get_type_hints(TopKLossOptions)
    assert {n: t for n, t in topk.items() if n not in hints} == {"support": str, "values": str}
    assert not LossOptions.__total__ and not TopKLossOptions.__total__
    defaults = {f.name: f.default for f in dataclasses.fields(TopKOptions) if f.name != "options"}
    assert defaults == _options.TOPK_DEFAULTS


# ------------------------------------------------------------------------------------------------
# KDLoss
# ------------------------------------------------------------------------------------------------

MODULE_CONFIGS = [
    dict(),
    dict(temperature=4.0, soft_weight=0.9, hard_weight=0.1),
    dict(temperature=2.0, soft_weight=0.5, hard_weight=0.5, divergence="ce", reduction="sum"),
    dict(temperature=0.5, reduction="none", ignore_index=3, hard_weight=0.2),
    dict(temperature=1.0, soft_weight=0.0, hard_weight=1.0, reduction="mean"),
]


@pytest.mark.fused_only
@pytest.mark.parametrize(
    "config", MODULE_CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "default"
)
def test_module_matches_function(kdfused_mod, device, gen, seed, config):
    """crit = KDLoss(**config); crit(s, t, labels) == kd_loss(s, t, labels, **config), bitwise,
    and both match the oracle."""
    crit = kdfused_mod.KDLoss(**config)
    assert isinstance(crit, torch.nn.Module)
    assert list(crit.parameters()) == []
    s = make_logits((4, 5, 60), torch.float32, device, gen)
    t = make_logits((4, 5, 60), torch.float32, device, gen)
    labels = make_labels(
        (4, 5), 60, device, gen, 0.2, ignore_index=config.get("ignore_index", -100)
    )
    use_labels = labels if config.get("hard_weight", 0.0) > 0 or "ignore_index" in config else None
    s1 = s.clone().requires_grad_(True)
    s2 = s.clone().requires_grad_(True)
    l1 = crit(s1, t, use_labels)
    l2 = kdfused_mod.kd_loss(s2, t, use_labels, **config)
    assert torch.equal(l1, l2)
    (l1 if l1.dim() == 0 else l1.sum()).backward()
    (l2 if l2.dim() == 0 else l2.sum()).backward()
    assert torch.equal(s1.grad, s2.grad)
    check_against_oracle(
        lambda a, b, y, **_: crit(a, b, y),
        s,
        t,
        use_labels,
        grad_teacher=True,
        ctx=_ctx(seed, **config),
        **config,
    )


@pytest.mark.fused_only
def test_module_labels_optional(kdfused_mod, device, gen):
    crit = kdfused_mod.KDLoss(temperature=2.0)
    s = make_logits((3, 10), torch.float32, device, gen)
    t = make_logits((3, 10), torch.float32, device, gen)
    assert torch.equal(crit(s, t), kdfused_mod.kd_loss(s, t, temperature=2.0))


@pytest.mark.fused_only
@pytest.mark.parametrize(
    "bad,pattern",
    [
        (dict(temperature=0.0), "temperature"),
        (dict(temperature=math.nan), "temperature"),
        (dict(soft_weight=-1.0), "weight"),
        (dict(hard_weight=math.inf), "weight"),
        (dict(divergence="js"), "divergence"),
        (dict(reduction="avg"), "reduction"),
    ],
)
def test_module_bad_config(kdfused_mod, bad, pattern):
    """A bad configuration raises (at construction or at the latest at the first call)."""
    s, t = torch.randn(3, 10), torch.randn(3, 10)
    y = torch.randint(0, 10, (3,))
    with pytest.raises((ValueError, TypeError, RuntimeError), match=f"(?i){pattern}"):
        crit = kdfused_mod.KDLoss(**bad)
        crit(s, t, y)


@pytest.mark.fused_only
def test_docstrings_cover_the_options(kdfused_mod):
    """kd_loss's docstring documents every parameter and every divergence; KDLoss's and
    KDLossFunction's have an example that uses them."""
    from kdfused._checks import DIVERGENCES

    doc = kdfused_mod.kd_loss.__doc__
    for name in inspect.signature(kdfused_mod.kd_loss).parameters:
        assert f"{name}:" in doc or f"{name}," in doc, f"kd_loss docstring misses {name}"
    for divergence in DIVERGENCES:
        assert f'"{divergence}"' in doc, f"kd_loss docstring misses divergence {divergence!r}"
    assert "KDLoss(" in kdfused_mod.KDLoss.__doc__
    assert "KDLossFunction.apply(" in kdfused_mod.KDLossFunction.__doc__


@pytest.mark.fused_only
def test_module_training_step(kdfused_mod, device, gen):
    """A distillation step: student and teacher Linear layers, KDLoss, SGD; the student's
    parameters get finite gradients, the teacher (under no_grad) none; the loss goes down."""
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    student = torch.nn.Linear(16, 50).to(device)
    teacher = torch.nn.Linear(16, 50).to(device)
    crit = kdfused_mod.KDLoss(temperature=4.0, soft_weight=0.9, hard_weight=0.1)
    opt = torch.optim.SGD(student.parameters(), lr=0.5)
    x = torch.randn(32, 16, device=device)
    y = torch.randint(0, 50, (32,), device=device)
    losses = []
    for _ in range(20):
        with torch.no_grad():
            t = teacher(x)
        loss = crit(student(x), t, y)
        opt.zero_grad()
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in student.parameters())
        opt.step()
        losses.append(loss.item())
    assert teacher.weight.grad is None
    assert losses[-1] < losses[0]
