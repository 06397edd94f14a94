"""Distil small causal LMs inside the Hugging Face Trainer with kdfused's ``KDTrainer``.

For each of two model families, Llama and Gemma 2 (``final_logit_softcapping`` on, as in the real
Gemma 2), all built from configs here (nothing is downloaded):

1. a teacher (4 layers, hidden 256) is trained on hard labels with the ordinary
   ``transformers.Trainer`` (the model's own loss);
2. two copies of one student (2 layers, hidden 128), same initial weights, same batches in the
   same order, same optimizer and schedule:
     hard       ``transformers.Trainer`` on hard labels (the model's own loss)
     distilled  ``kdfused.integrations.transformers.KDTrainer``: T = 2, 0.5 soft (T^2-scaled KL
                to the teacher) + 0.5 hard, one ``kdfused.linear_kd_loss`` call per micro-batch
                on the two models' last hidden states (Gemma 2's softcap applied inside it;
                ``--chunk-size`` rows per chunk, 128 by default);
3. held-out perplexity (and bits per byte) of the teacher, the untrained student and both
   students, per family.

Corpus and tokenizer are those of ``llm_distill.py`` (Python's own stdlib modules, every 10th
held out; a byte-level BPE trained on the training files).

    pip install transformers tokenizers
    python examples/hf_trainer_distill.py             # writes examples/results/hf_trainer_distill.*
    python examples/hf_trainer_distill.py --quick     # tiny models, a smoke run (seconds)
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from llm_distill import (  # noqa: E402
    QUICK_SIZES,
    Sizes,
    Tokenizer,
    add_config_options,
    batches,
    config_from_args,
    evaluation,
    held_out_ce,
    llama,
    stdlib_modules,
    window_bytes,
)

FAMILIES = ("llama", "gemma2")
WAYS = ("hard", "distilled")


@dataclass
class Config(Sizes):
    vocab: int = 4096  # BPE vocabulary (0: bytes)
    lr: float = 3e-3
    max_grad_norm: float = 1.0  # the Trainer's gradient clipping (its default; 0: none)
    temperature: float = 2.0
    soft_weight: float = 0.5
    hard_weight: float = 0.5
    chunk_size: int = 128  # rows per chunk of linear_kd_loss (0: its automatic choice)
    softcap: float = 30.0  # Gemma 2's final_logit_softcapping (its released models' value)
    eval_windows: int = 64  # held-out windows of `seq` tokens
    files: int = 0  # use only the first `files` stdlib modules (0: all)
    held_out_every: int = 10
    seed: int = 0


QUICK = QUICK_SIZES  # llm_distill.py's --quick models, steps and files


def gemma2(vocab: int, hidden: int, layers: int, seq: int, seed: int, softcap: float):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(seed)
    heads = max(1, hidden // 32)
    cfg = Gemma2Config(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=8 * hidden // 3 // 32 * 32,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        head_dim=32,
        query_pre_attn_scalar=32,
        max_position_embeddings=seq,
        sliding_window=seq,
        final_logit_softcapping=softcap,
    )
    cfg._attn_implementation = "eager"  # Gemma 2's attention softcap needs the eager attention
    return Gemma2ForCausalLM(cfg)


def build(family: str, vocab: int, hidden: int, layers: int, cfg: Config, seed: int):
    if family == "llama":
        return llama(vocab, hidden, layers, cfg.seq, seed)
    return gemma2(vocab, hidden, layers, cfg.seq, seed, cfg.softcap)


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def training_args(cfg: Config, outdir: str, steps: int):
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=outdir,
        max_steps=steps,
        per_device_train_batch_size=cfg.batch,
        learning_rate=cfg.lr,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, steps // 10),
        weight_decay=0.0,
        adam_beta2=0.95,
        max_grad_norm=cfg.max_grad_norm,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        train_sampling_strategy="sequential",  # the batches in the order given: same for both
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
        seed=cfg.seed,
    )


def dataset(windows: torch.Tensor) -> list[dict]:
    """Causal-LM examples: labels = input_ids (the models shift them)."""
    return [{"input_ids": w, "labels": w} for w in windows]


def train(trainer) -> dict:
    from transformers import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # the losses go to the report, not one line each
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"loss": losses, "train_seconds": seconds}


def run(cfg: Config, verbose: bool = True) -> dict:
    from transformers import Trainer

    from kdfused.integrations.transformers import KDTrainer

    say = print if verbose else (lambda *a, **k: None)
    t_all = time.perf_counter()
    modules = stdlib_modules(cfg.files)
    k = cfg.held_out_every
    held = [m for i, m in enumerate(modules) if i % k == k - 1]
    train_set = [m for i, m in enumerate(modules) if i % k != k - 1]
    tok = Tokenizer([t for _, t in train_set], cfg.vocab)
    train_ids = tok.stream([t for _, t in train_set])
    held_ids = tok.stream([t for _, t in held])
    n_win = len(held_ids) // cfg.seq
    pick = torch.linspace(0, n_win - 1, min(cfg.eval_windows, n_win)).round().long()
    windows = held_ids[: n_win * cfg.seq].view(n_win, cfg.seq)[pick]
    n_tok, n_bytes = windows[:, 1:].numel(), window_bytes(tok, windows)
    V = tok.vocab_size
    say(
        f"corpus: {len(train_set)} stdlib modules ({len(train_ids)} tokens) for training, "
        f"{len(held)} held out; {tok.kind}, V = {V}"
    )

    def evaluate(model) -> dict:
        device = next(model.parameters()).device
        return evaluation(held_out_ce(model, windows.to(device)), n_tok, n_bytes)

    teacher_data = dataset(
        batches(train_ids, cfg.teacher_steps, cfg.batch, cfg.seq, cfg.seed + 11).flatten(0, 1)
    )
    student_data = dataset(
        batches(train_ids, cfg.student_steps, cfg.batch, cfg.seq, cfg.seed + 22).flatten(0, 1)
    )
    families = {}
    with tempfile.TemporaryDirectory() as tmp:
        for family in FAMILIES:
            res: dict = {}
            teacher = build(family, V, cfg.teacher_hidden, cfg.teacher_layers, cfg, cfg.seed + 1)
            trainer = Trainer(
                teacher,
                training_args(cfg, tmp, cfg.teacher_steps),
                train_dataset=teacher_data,
            )
            h = train(trainer)
            res["teacher"] = dict(h, params=n_params(teacher), final=evaluate(teacher))
            say(
                f"{family} teacher ({n_params(teacher) / 1e6:.2f}M): held-out perplexity "
                f"{res['teacher']['final']['perplexity']:.2f} ({h['train_seconds']:.0f} s)"
            )
            student0 = build(family, V, cfg.student_hidden, cfg.student_layers, cfg, cfg.seed + 2)
            res["student_params"] = n_params(student0)
            res["student_initial"] = evaluate(student0)
            res["students"] = {}
            for way in WAYS:
                student = copy.deepcopy(student0)
                args = training_args(cfg, tmp, cfg.student_steps)
                if way == "hard":
                    trainer = Trainer(student, args, train_dataset=student_data)
                else:
                    trainer = KDTrainer(
                        student,
                        teacher,
                        args,
                        temperature=cfg.temperature,
                        soft_weight=cfg.soft_weight,
                        hard_weight=cfg.hard_weight,
                        chunk_size=cfg.chunk_size or None,
                        train_dataset=student_data,
                    )
                h = train(trainer)
                res["students"][way] = dict(h, final=evaluate(student))
                say(
                    f"{family} student, {way}: held-out perplexity "
                    f"{res['students'][way]['final']['perplexity']:.2f} "
                    f"({h['train_seconds']:.0f} s)"
                )
                del trainer
            families[family] = res
    import transformers

    return {
        "config": asdict(cfg),
        "families": families,
        "corpus": {
            "source": f"Python {platform.python_version()} standard library, top-level *.py",
            "train_files": len(train_set),
            "held_out_files": len(held),
            "train_tokens": len(train_ids),
            "tokenizer": tok.kind,
            "vocab": V,
            "eval_windows": len(windows),
            "eval_tokens": n_tok,
        },
        "environment": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "threads": torch.get_num_threads(),
            "device": "cuda" if torch.cuda.is_available() else "cpu",
            "platform": platform.platform(),
        },
        "wall_seconds": round(time.perf_counter() - t_all, 1),
    }


LABELS = {
    "hard": "hard labels (transformers.Trainer)",
    "distilled": "KDTrainer, T={t:g}, {s:g} soft + {h:g} hard",
}


def table(out: dict) -> str:
    c = out["config"]
    rows = [
        "| family | model | training | held-out ppl | bits/byte | train time |",
        "|---|---|---|---:|---:|---:|",
    ]
    for family, r in out["families"].items():
        t = r["teacher"]
        rows.append(
            f"| {family} | teacher ({t['params'] / 1e6:.2f}M) | hard labels, "
            f"{c['teacher_steps']} steps | {t['final']['perplexity']:.2f} | "
            f"{t['final']['bits_per_byte']:.3f} | {t['train_seconds']:.0f} s |"
        )
        s0 = r["student_initial"]
        rows.append(
            f"| {family} | student ({r['student_params'] / 1e6:.2f}M) | untrained | "
            f"{s0['perplexity']:.1f} | {s0['bits_per_byte']:.3f} | - |"
        )
        for way in WAYS:
            h = r["students"][way]
            how = LABELS[way].format(t=c["temperature"], s=c["soft_weight"], h=c["hard_weight"])
            rows.append(
                f"| {family} | student | {how}, {c['student_steps']} steps | "
                f"{h['final']['perplexity']:.2f} | {h['final']['bits_per_byte']:.3f} | "
                f"{h['train_seconds']:.0f} s |"
            )
    return "\n".join(rows)


def markdown(out: dict) -> str:
    c, co, env = out["config"], out["corpus"], out["environment"]
    return (
        f"{table(out)}\n\n"
        f"Corpus: {co['source']}: {co['train_files']} modules for training "
        f"({co['train_tokens']} tokens), {co['held_out_files']} held out (every "
        f"{c['held_out_every']}th by name); perplexity on {co['eval_windows']} windows of "
        f"{c['seq']} tokens. Tokenizer: {co['tokenizer']}, V = {co['vocab']}.\n\n"
        f"Models built from configs: teachers {c['teacher_layers']} layers, hidden "
        f"{c['teacher_hidden']}; students {c['student_layers']} layers, hidden "
        f"{c['student_hidden']}; Gemma 2 with final_logit_softcapping = {c['softcap']:g}. "
        f"KDTrainer: {c['chunk_size'] or 'automatic'} rows per linear_kd_loss chunk. "
        f"Batch {c['batch']} x {c['seq']} tokens, AdamW lr {c['lr']:g} (cosine, 10% warmup), "
        f"gradient clipping {c['max_grad_norm'] or 'off'} (max norm); "
        f"both students of a family start from the same weights and see the same batches in "
        f"the same order.\n\n"
        f"torch {env['torch']}, transformers {env['transformers']}, {env['device']}, "
        f"{env['threads']} thread(s); whole run {out['wall_seconds']:.0f} s.\n\n"
        f"Command: `{out['command']}`\n"
    )


def write(out: dict, outdir: str) -> None:
    os.makedirs(outdir, exist_ok=True)
    with open(os.path.join(outdir, "hf_trainer_distill.json"), "w") as f:
        json.dump(out, f, indent=1)
    with open(os.path.join(outdir, "hf_trainer_distill.md"), "w") as f:
        f.write(markdown(out))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_config_options(ap, Config)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    ap.add_argument(
        "--out",
        default=None,
        help="directory for hf_trainer_distill.{json,md} (default: examples/results, none "
        "with --quick)",
    )
    args = ap.parse_args(argv)
    cfg = config_from_args(Config, QUICK, args)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = run(cfg)
    out["command"] = "python examples/hf_trainer_distill.py" + "".join(
        " " + a for a in (argv if argv is not None else sys.argv[1:])
    )
    here = os.path.dirname(os.path.abspath(__file__))
    outdir = args.out or (None if args.quick else os.path.join(here, "results"))
    if outdir:
        write(out, outdir)
        print(f"wrote {os.path.join(outdir, 'hf_trainer_distill')}.{{json,md}}")
    print(table(out))
    bad = [
        (f, w)
        for f, r in out["families"].items()
        for w, h in r["students"].items()
        if not all(math.isfinite(x) for x in h["loss"])
    ]
    if bad:
        raise SystemExit(f"non-finite losses: {bad}")
    return out


if __name__ == "__main__":
    main()
