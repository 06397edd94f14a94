"""kdfused.integrations.trl.DistillationTrainer against TRL's own DistillationTrainer, in training.

A tiny on-policy distillation built from configs (nothing downloaded): Llama student (1 layer,
hidden 32) and teacher (2 layers, hidden 48) from ``LlamaConfig``s, V = 64, a character-level
tokenizer (``tokenizers`` WordLevel in ``PreTrainedTokenizerFast``, left padding), eight plain-text
prompts, completions of up to 6 tokens sampled by the student on the CPU, batches of 2 prompts,
2 accumulation steps, 3 optimizer steps of plain SGD (Adam's normalised steps would make
rounding-level gradient differences lr-sized), float32, beta = 0.5, T = 1.5.

Both trainers run from the same initial weights, data and seed (``args.seed``, which TRL uses for
the data order and the sampling), so they sample the same completions (checked) as long as the
students stay equal to rounding: the per-step losses and entropies agree to 1e-5 relative, and so
do the student's parameters after the 3 steps. The subclass calls kdfused once per micro-batch,
with TRL's module-level ``_chunked_divergence_loss`` bound to kdfused's function only during the
call (restored after it, after an error, and left as it was when ``patch_distillation_trainer``
had been called).
"""

from __future__ import annotations

import pytest
import torch
import trl  # a requirement of this file (pinned in requirements-dev.txt), not skipped
import trl.trainer.distillation_trainer as trl_trainer
from datasets import Dataset
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from kdfused.integrations import trl as ours

pytestmark = [
    pytest.mark.fused_only,
    # TRL 1.16 reads a property that transformers 5 deprecates
    pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning"),
]

V = 64
STEPS, BATCH, ACCUMULATION, COMPLETION = 3, 2, 2, 6
PROMPTS = [
    "the cat sat",
    "a dog ran",
    "hello world",
    "on the mat",
    "we go far",
    "it is red",
    "see the sun",
    "by the sea",
]


def _tokenizer() -> PreTrainedTokenizerFast:
    chars = "abcdefghijklmnopqrstuvwxyz ,."
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{c: i + 3 for i, c in enumerate(chars)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tk.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tk,
        pad_token="<pad>",
        eos_token="<eos>",
        unk_token="<unk>",
        padding_side="left",
    )


def _model(layers: int, hidden: int, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=V,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=None,
        tie_word_embeddings=False,
        initializer_range=0.2,  # logits far from uniform: a loss of order 0.1, not 1e-3
    )
    return LlamaForCausalLM(config)


def _trainer(cls, seed: int, tmp_path, **overrides):
    seed %= 2**31  # numpy's seeding, which TRL's set_seed calls, takes 32 bits
    args = dict(
        output_dir=str(tmp_path),
        use_cpu=True,
        report_to="none",
        per_device_train_batch_size=BATCH,
        gradient_accumulation_steps=ACCUMULATION,
        max_steps=STEPS,
        max_completion_length=COMPLETION,
        # plain SGD: Adam's normalised steps would turn rounding-level gradients into lr-sized ones
        optim="sgd",
        learning_rate=2.0,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        seed=seed,
        beta=0.5,
        temperature=1.5,
        bf16=False,
        activation_checkpointing=False,  # TRL's default is on (gradient_checkpointing=True)
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    args.update(overrides)
    return cls(
        model=_model(1, 32, seed),
        teacher_model=_model(2, 48, seed + 1),
        args=trl.DistillationConfig(**args),
        train_dataset=Dataset.from_list([{"prompt": p} for p in PROMPTS]),
        processing_class=_tokenizer(),
    )


def _train(cls, seed, tmp_path):
    """Per-step logged losses and entropies, every micro-batch's completion ids, final weights."""
    trainer = _trainer(cls, seed, tmp_path)
    initial = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    completions = []
    generate = trainer._generate_and_score_completions

    def recording(inputs):
        out = generate(inputs)
        completions.append(out["completion_ids"].tolist())
        return out

    trainer._generate_and_score_completions = recording
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h and "train_loss" not in h]
    final = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    return dict(
        loss=[h["loss"] for h in logs],
        entropy=[h["entropy"] for h in logs],
        completions=completions,
        initial=initial,
        final=final,
    )


def _counting(monkeypatch):
    """Replaces kdfused's chunked_divergence_loss by a wrapper that counts its calls and checks
    that TRL's global is bound to it while it runs."""
    calls = []
    real = ours.chunked_divergence_loss

    def counting(*args, **kwargs):
        calls.append(trl_trainer._chunked_divergence_loss is counting)
        return real(*args, **kwargs)

    monkeypatch.setattr(ours, "chunked_divergence_loss", counting)
    return calls


def test_subclass_of_trl():
    assert issubclass(ours.DistillationTrainer, trl.DistillationTrainer)
    assert ours.DistillationTrainer is ours.DistillationTrainer  # built once
    assert ours.DistillationTrainer.__module__ == "kdfused.integrations.trl"
    assert "DistillationTrainer" in dir(ours)


def test_matches_trl_trainer(seed, tmp_path, monkeypatch):
    original = trl_trainer._chunked_divergence_loss
    kernel_calls = []
    real_kernel = ours._layer_loss

    def counting_kernel(*args, **kwargs):
        kernel_calls.append(1)
        return real_kernel(*args, **kwargs)

    monkeypatch.setattr(ours, "_layer_loss", counting_kernel)
    reference = _train(trl.DistillationTrainer, seed, tmp_path / "trl")
    assert not kernel_calls  # TRL's own trainer uses TRL's loss
    calls = _counting(monkeypatch)
    fused = _train(ours.DistillationTrainer, seed, tmp_path / "kdfused")

    assert len(calls) == STEPS * ACCUMULATION and all(calls), calls
    assert len(kernel_calls) == STEPS * ACCUMULATION
    assert trl_trainer._chunked_divergence_loss is original  # restored after every call

    assert fused["completions"] == reference["completions"]  # the same samples
    assert len(reference["loss"]) == STEPS
    torch.testing.assert_close(fused["loss"], reference["loss"], rtol=1e-5, atol=0)
    torch.testing.assert_close(fused["entropy"], reference["entropy"], rtol=1e-5, atol=0)
    assert all(x > 1e-2 for x in reference["loss"]), reference["loss"]
    start, end = reference["initial"], reference["final"]
    moved = max((end[k] - start[k]).abs().max() for k in end)
    assert moved > 1e-2  # the steps changed the student, so the comparison below means something
    for name, value in reference["final"].items():
        torch.testing.assert_close(
            fused["final"][name], value, rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}"
        )


def _one_micro_batch(seed, tmp_path, cls):
    trainer = _trainer(cls, seed, tmp_path, max_steps=1, gradient_accumulation_steps=1)
    trainer.train()
    return trainer


def test_global_restored_after_error(seed, tmp_path, monkeypatch):
    original = trl_trainer._chunked_divergence_loss

    def failing(*args, **kwargs):
        assert trl_trainer._chunked_divergence_loss is failing
        raise RuntimeError("loss failed")

    monkeypatch.setattr(ours, "chunked_divergence_loss", failing)
    with pytest.raises(RuntimeError, match="loss failed"):
        _one_micro_batch(seed, tmp_path, ours.DistillationTrainer)
    assert trl_trainer._chunked_divergence_loss is original


def test_after_patch_distillation_trainer(seed, tmp_path, monkeypatch):
    """With TRL's trainer already patched, the subclass leaves the patched global in place."""
    original = trl_trainer._chunked_divergence_loss
    monkeypatch.setattr(trl_trainer, "_chunked_divergence_loss", original)  # put back afterwards
    monkeypatch.setattr(ours, "_ORIGINAL", None)
    ours.patch_distillation_trainer()
    patched = trl_trainer._chunked_divergence_loss
    assert patched is ours.chunked_divergence_loss
    trainer = _one_micro_batch(seed, tmp_path, ours.DistillationTrainer)
    assert trl_trainer._chunked_divergence_loss is patched
    assert trainer.state.global_step == 1
