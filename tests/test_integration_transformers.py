"""kdfused.integrations.transformers.KDTrainer against the loss written out by hand.

Tiny causal LMs built from their configs (nothing is downloaded), in float64: Llama, Gemma 2 with
``final_logit_softcapping``, Granite with ``logits_scaling`` and Cohere with ``logit_scale``,
each once as the student and once as the teacher. The reference loss comes from each model's FULL
logits (``model(input_ids).logits``, which transformers has already scaled / softcapped, so this
also checks the config reading of ``logit_transform``), shifted by one, in plain torch
(log_softmax, KL / JSD, cross-entropy); the gradients of every student parameter are compared with
autograd's of that loss. Also: gradient accumulation (two micro-batches of 2 with unequal token
counts vs one batch of 4: the same SGD step, and the step of the whole batch's loss), the same
over two DDP processes (CPU, gloo: tests/hf_ddp_worker.py), ``evaluate()``'s eval_loss, bf16
autocast, the errors, and the ImportError without transformers (simulated). Inputs come from the
suite's per-test seed.
"""

from __future__ import annotations

import copy
import math
import sys

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from kdfused.integrations import transformers as kdt  # noqa: E402

pytestmark = pytest.mark.fused_only

V = 97
SMALL = dict(
    vocab_size=V,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)


def _config(family: str, hidden: int):
    kw = dict(SMALL, hidden_size=hidden)
    if family == "llama":
        return transformers.LlamaConfig(**kw)
    if family == "gemma2":
        return transformers.Gemma2Config(**kw, head_dim=hidden // 4, final_logit_softcapping=2.5)
    if family == "granite":
        return transformers.GraniteConfig(**kw, logits_scaling=4.0)
    if family == "cohere":
        return transformers.CohereConfig(**kw, logit_scale=0.5)
    raise AssertionError(family)


def _model(family: str, hidden: int = 32):
    """A float64 causal LM whose logits are O(1..10) (random init gives ~0.1: the scale and the
    softcap would then hardly matter)."""
    cls = {
        "llama": transformers.LlamaForCausalLM,
        "gemma2": transformers.Gemma2ForCausalLM,
        "granite": transformers.GraniteForCausalLM,
        "cohere": transformers.CohereForCausalLM,
    }[family]
    model = cls(_config(family, hidden)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3 if p.dim() > 1 else 0.1)
    return model


def _args(tmp_path, **kw):
    kw = dict(
        output_dir=str(tmp_path),
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        **kw,
    )
    return transformers.TrainingArguments(**kw)


def _batch(gen, b=3, length=11, pad=True):
    ids = torch.randint(0, V, (b, length), generator=gen)
    mask = torch.ones(b, length, dtype=torch.int64)
    labels = ids.clone()
    if pad:
        mask[0, -3:] = 0  # right padding, not in the loss
        labels[0, -3:] = -100
    labels[1, 2:5] = -100  # a prompt-like span
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _reference(student, teacher, batch, *, T, soft, hard, divergence, beta, divisor=None):
    """The loss from the full (transformed) logits, in float64."""
    out_s = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    with torch.no_grad():
        out_t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    zs, zt = out_s.logits[:, :-1].double(), out_t.logits[:, :-1].double()
    y = batch["labels"][:, 1:]
    valid = y != -100
    zs, zt, y = zs[valid], zt[valid], y[valid]
    log_q, log_p = F.log_softmax(zs / T, -1), F.log_softmax(zt / T, -1)
    p, q = log_p.exp(), log_q.exp()
    if divergence == "kl":
        d = (p * (log_p - log_q)).sum(-1)
    elif divergence == "jsd":
        log_m = torch.log(beta * p + (1 - beta) * q)
        d = beta * (p * (log_p - log_m)).sum(-1) + (1 - beta) * (q * (log_q - log_m)).sum(-1)
    else:
        raise AssertionError(divergence)
    ce = F.cross_entropy(zs, y, reduction="none")
    total = (soft * T * T * d + hard * ce).sum()
    return total / (divisor if divisor is not None else max(int(valid.sum()), 1))


# (student, teacher): every family once on each side
PAIRS = [("llama", "gemma2"), ("gemma2", "granite"), ("granite", "cohere"), ("cohere", "llama")]
# (divergence, beta, T, soft, hard, num_items_in_batch)
CASES = [
    ("kl", 0.5, 2.0, 0.5, 0.5, None),
    ("jsd", 0.3, 0.7, 0.8, 0.3, "int"),
    ("kl", 0.5, 1.5, 1.0, 0.0, "tensor"),
    ("jsd", 0.6, 3.0, 0.25, 1.0, None),
]


# each pair with two of the cases (every case twice)
COMBOS = [(pair, CASES[(i + k) % len(CASES)]) for i, pair in enumerate(PAIRS) for k in (0, 2)]


@pytest.mark.parametrize(
    "pair, case", COMBOS, ids=[f"{'-'.join(p)}-{c[0]}-{c[-1]}" for p, c in COMBOS]
)
def test_compute_loss_matches_full_logits(tmp_path, gen, pair, case):
    divergence, beta, T, soft, hard, nib = case
    student = _model(pair[0])
    teacher = _model(pair[1], hidden=48)
    ref_student = copy.deepcopy(student)
    trainer = kdt.KDTrainer(
        student,
        teacher,
        _args(tmp_path),
        temperature=T,
        soft_weight=soft,
        hard_weight=hard,
        divergence=divergence,
        beta=beta,
        chunk_size=8,
    )
    batch = _batch(gen)
    n_valid = int((batch["labels"][:, 1:] != -100).sum())
    divisor = {None: None, "int": n_valid + 7, "tensor": torch.tensor(float(n_valid + 3))}[nib]
    loss = trainer.compute_loss(student, dict(batch), num_items_in_batch=divisor)
    ref = _reference(
        ref_student,
        teacher,
        batch,
        T=T,
        soft=soft,
        hard=hard,
        divergence=divergence,
        beta=beta,
        divisor=divisor,
    )
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)
    loss.backward()
    ref.backward()
    ref_grads = dict(ref_student.named_parameters())
    n = 0
    for name, p in student.named_parameters():
        g_ref = ref_grads[name].grad
        assert p.grad is not None and g_ref is not None, name
        torch.testing.assert_close(p.grad, g_ref, rtol=1e-8, atol=1e-11, msg=name)
        n += 1
    assert n > 5
    assert all(p.grad is None for p in teacher.parameters())


@pytest.mark.parametrize(
    "family, scale, cap",
    [("llama", 1.0, None), ("gemma2", 1.0, 2.5), ("granite", 0.25, None), ("cohere", 0.5, None)],
)
def test_logit_transform(family, scale, cap):
    assert kdt.logit_transform(_config(family, 32)) == (scale, cap)


def test_logit_transform_order():
    class C:
        model_type = "hyperclovax"
        logits_scaling = 3.0
        logit_scale = None
        output_multiplier = None

    assert kdt.logit_transform(C()) == (3.0, None)
    C.model_type = "granite"
    assert kdt.logit_transform(C()) == (1 / 3.0, None)
    C.output_multiplier = 2.0
    assert kdt.logit_transform(C()) == (2.0, None)
    C.logit_scale = 0.0  # a real 0 is kept (and rejected by the loss's checks)
    assert kdt.logit_transform(C()) == (0.0, None)


def _dataset(gen, n=4, length=10):
    """n sequences; the valid (shifted) tokens per pair of rows differ a lot."""
    ids = torch.randint(0, V, (n, length), generator=gen)
    labels = ids.clone()
    labels[0, 1:8] = -100  # row 0: 2 valid, row 1: 9 -> micro-batch 1: 11
    labels[2, 4:] = -100  # row 2: 3, row 3: 9 -> micro-batch 2: 12 ... and row 3 more masked:
    labels[3, 1:3] = -100  # row 3: 7 -> 10
    return [{"input_ids": ids[i], "labels": labels[i]} for i in range(n)]


def _train_one_step(tmp_path, student, teacher, data, batch, accumulation):
    args = _args(
        tmp_path,
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulation,
        max_steps=1,
        learning_rate=0.5,
        optim="sgd",
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=0.0,
        train_sampling_strategy="sequential",
    )
    trainer = kdt.KDTrainer(
        student,
        teacher,
        args,
        temperature=2.0,
        soft_weight=0.7,
        hard_weight=0.4,
        train_dataset=data,
    )
    trainer.train()
    return student


def test_gradient_accumulation_equals_big_batch(tmp_path, gen):
    teacher = _model("llama", hidden=48)
    student = _model("llama")
    before = copy.deepcopy(student)
    data = _dataset(gen)
    a = _train_one_step(tmp_path / "a", copy.deepcopy(student), teacher, data, 2, 2)
    b = _train_one_step(tmp_path / "b", copy.deepcopy(student), teacher, data, 4, 1)
    moved = 0.0
    for (name, pa), pb, p0 in zip(a.named_parameters(), b.parameters(), before.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-10, atol=1e-12, msg=name)
        moved = max(moved, float((pa - p0).detach().abs().max()))
    assert moved > 1e-3

    # and the step is SGD on the loss of the whole batch: sum over its valid tokens / their count
    ref = copy.deepcopy(before)
    full = {k: torch.stack([d[k] for d in data]) for k in data[0]}
    full["attention_mask"] = torch.ones_like(full["input_ids"])
    loss = _reference(ref, teacher, full, T=2.0, soft=0.7, hard=0.4, divergence="kl", beta=0.5)
    loss.backward()
    for (name, pa), pr in zip(a.named_parameters(), ref.parameters()):
        torch.testing.assert_close(pa, pr.detach() - 0.5 * pr.grad, rtol=1e-9, atol=1e-11, msg=name)


def test_evaluate_reports_the_loss(tmp_path, gen):
    teacher = _model("gemma2", hidden=48)
    student = _model("llama")
    data = _dataset(gen)
    trainer = kdt.KDTrainer(
        student,
        teacher,
        _args(tmp_path, per_device_eval_batch_size=4),
        eval_dataset=data,
        divergence="jsd",
    )
    metrics = trainer.evaluate()
    full = {k: torch.stack([d[k] for d in data]) for k in data[0]}
    full["attention_mask"] = torch.ones_like(full["input_ids"])
    with torch.no_grad():
        ref = _reference(
            student, teacher, full, T=2.0, soft=0.5, hard=0.5, divergence="jsd", beta=0.5
        )
    assert math.isclose(metrics["eval_loss"], float(ref), rel_tol=1e-9)


def test_errors(tmp_path, gen):
    student = _model("llama")
    other_vocab = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(**dict(SMALL, vocab_size=V + 4))
    )
    with pytest.raises(ValueError, match="vocabulary"):
        kdt.KDTrainer(student, other_vocab.double(), _args(tmp_path))
    teacher = _model("llama")
    with pytest.raises(ValueError, match="divergence"):
        kdt.KDTrainer(student, teacher, _args(tmp_path), divergence="nope")
    with pytest.raises(ValueError, match="temperature"):
        kdt.KDTrainer(student, teacher, _args(tmp_path), temperature=0.0)
    with pytest.raises(ValueError, match="chunk_size"):
        kdt.KDTrainer(student, teacher, _args(tmp_path), chunk_size=0)
    trainer = kdt.KDTrainer(student, teacher, _args(tmp_path))
    batch = _batch(gen)
    del batch["labels"]
    with pytest.raises(ValueError, match="labels"):
        trainer.compute_loss(student, batch)


def test_missing_transformers_import_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    monkeypatch.setattr(kdt, "_CACHE", {})
    with pytest.raises(ImportError) as info:
        kdt.KDTrainer  # noqa: B018
    msg = str(info.value)
    assert "'transformers'" in msg and "pip install transformers" in msg, msg
    assert "KDTrainer" in msg, msg
    assert isinstance(info.value.__cause__, ImportError)
    # logit_transform needs no transformers
    assert kdt.logit_transform(type("C", (), {"logit_scale": 2.0})()) == (2.0, None)


def test_bf16_autocast(tmp_path, gen):
    """bf16=True (CPU autocast): the loss is computed from bfloat16 projections, near the float32
    one; the float32 student's gradients are float32."""
    student = _model("llama").float()
    teacher = _model("gemma2", hidden=48).float()
    batch = _batch(gen)
    plain = kdt.KDTrainer(student, teacher, _args(tmp_path))
    ref = plain.compute_loss(student, dict(batch))
    trainer = kdt.KDTrainer(student, teacher, _args(tmp_path, bf16=True))
    with trainer.compute_loss_context_manager():
        loss = trainer.compute_loss(student, dict(batch))
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    lo, r = float(loss.detach()), float(ref.detach())
    assert abs(lo - r) < 0.05 * abs(r) + 1e-3
    assert lo != r  # bfloat16 did happen
    loss.backward()
    assert all(p.grad.dtype == torch.float32 for p in student.parameters() if p.grad is not None)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_processes(tmp_path, seed):
    """Two CPU processes (gloo), 1 row each and 2 accumulation steps: the step is the one of the
    whole 4-row batch (num_items_in_batch counted over both processes, the loss multiplied by
    the process count that DDP's gradient averaging divides by). tests/hf_ddp_worker.py."""
    import os
    import subprocess

    worker = os.path.join(os.path.dirname(__file__), "hf_ddp_worker.py")
    out = tmp_path / "out.json"
    for _attempt in range(3):
        # The port was free a moment ago; another process (tests run in parallel) may take it
        # before rank 0 binds it. Then rank 0 cannot listen: try another port.
        port = str(_free_port())
        procs = []
        for rank in range(2):
            env = dict(
                os.environ,
                RANK=str(rank),
                LOCAL_RANK=str(rank),
                WORLD_SIZE="2",
                LOCAL_WORLD_SIZE="2",
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=port,
                OMP_NUM_THREADS="1",
            )
            procs.append(
                subprocess.Popen(
                    [sys.executable, worker, str(out), str(seed % 2**31)],
                    env=env,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                )
            )
        first = procs[0].communicate(timeout=300)[0]
        if procs[0].returncode != 0 and "address already in use" in first.lower():
            procs[1].kill()  # (it would wait for rank 0's store until its timeout)
            logs = [first, procs[1].communicate()[0]]
            continue
        logs = [first, procs[1].communicate(timeout=300)[0]]
        break
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs)
    import json

    res = json.loads(out.read_text())
    assert res["world"] == 2
    assert res["moved"] > 1e-3
    assert res["max_rel_diff"] < 1e-10, res


def test_forward_is_restored(tmp_path, gen):
    """The forward redirection leaves no instance attribute behind (nor replaces one)."""
    student, teacher = _model("llama"), _model("llama")
    trainer = kdt.KDTrainer(student, teacher, _args(tmp_path))
    trainer.compute_loss(student, _batch(gen))
    assert "forward" not in vars(student) and "forward" not in vars(teacher)
    marker = student.forward
    student.forward = marker
    trainer.compute_loss(student, _batch(gen))
    assert vars(student)["forward"] is marker
