"""Distil a Hugging Face causal LM into a smaller one with kdfused, on Python's own sources.

Corpus: the top-level modules of the Python standard library that runs the script (the ``*.py``
files directly in ``sysconfig.get_paths()["stdlib"]``, sorted by name); every 10th file is held
out for perplexity. Tokenizer: a byte-level BPE trained on the training files with the
``tokenizers`` package (``--vocab`` tokens; plain bytes with ``--vocab 0`` or without
``tokenizers``). Nothing is downloaded.

1. A teacher (LlamaConfig: 4 layers, hidden 256) is trained on hard labels.
2. Three copies of one student (2 layers, hidden 128) are trained on the same batches, in
   lockstep (one step of each in turn, so that all three see the same machine load):
     hard     hard labels only: the model's own loss, ``student(ids, labels=ids).loss``
     kd_loss  ``kdfused.kd_loss`` on the materialised logits of student and teacher
     linear   ``kdfused.linear_kd_loss`` on the last hidden states and the ``lm_head`` weights:
              the N x V logits never exist
   Both distillations: T = 2, 0.5 soft (T^2-scaled KL) + 0.5 hard.
3. Report per way: the loss curve, held-out perplexity (and bits per byte), time per step and
   the peak memory of a step; and how closely the two kdfused ways agree (the first step to
   float32 precision, then the whole curve). Results: examples/results/llm_distill.{json,md,png}.

    pip install transformers tokenizers matplotlib
    python examples/llm_distill.py            # the committed run (see examples/README.md)
    python examples/llm_distill.py --quick    # tiny models, a smoke run (under a minute)

--teacher / --student take Hugging Face model names or paths instead (loaded with
``from_pretrained``; they must share a vocabulary; the teacher's tokenizer is used and the teacher
is not trained further).
"""

from __future__ import annotations

import argparse
import copy
import gc
import glob
import json
import math
import os
import platform
import sys
import sysconfig
import time
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F

import kdfused

# the process measurements the benchmarks use (peak resident memory, CPU time, machine)
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))
from _procinfo import PeakRSS, cpu_model, cpu_seconds, loadavg  # noqa: E402

WAYS = ("hard", "kd_loss", "linear")
MIB = float(1 << 20)


@dataclass
class Sizes:
    """Vocabulary, batches, models and steps: the fields hf_trainer_distill.py's Config shares."""

    vocab: int = 8192  # BPE vocabulary (0: bytes)
    seq: int = 128
    batch: int = 8
    teacher_layers: int = 4
    teacher_hidden: int = 256
    student_layers: int = 2
    student_hidden: int = 128
    teacher_steps: int = 160
    student_steps: int = 120


@dataclass
class Config(Sizes):
    teacher_lr: float = 3e-3
    student_lr: float = 3e-3
    temperature: float = 2.0
    soft_weight: float = 0.5
    hard_weight: float = 0.5
    chunk_size: int = 128  # rows per chunk of linear_kd_loss (0: its automatic choice)
    eval_every: int = 20
    eval_windows: int = 64  # held-out windows of `seq` tokens
    files: int = 0  # use only the first `files` stdlib modules (0: all)
    held_out_every: int = 10
    seed: int = 0


# --quick: tiny models, few steps, a few files (hf_trainer_distill.py's --quick as well)
QUICK_SIZES = dict(
    vocab=512,
    seq=32,
    batch=4,
    teacher_layers=2,
    teacher_hidden=64,
    student_layers=1,
    student_hidden=32,
    teacher_steps=30,
    student_steps=20,
    eval_windows=8,
    files=30,
    chunk_size=32,
)
QUICK = dict(QUICK_SIZES, teacher_lr=3e-3, student_lr=3e-3, eval_every=10)


# --------------------------------------------------------------------------- corpus, tokenizer
def stdlib_modules(limit: int = 0) -> list[tuple[str, str]]:
    """(file name, text) of the top-level stdlib modules, sorted by name."""
    root = sysconfig.get_paths()["stdlib"]
    paths = sorted(glob.glob(os.path.join(root, "*.py")))
    if limit:
        paths = paths[:limit]
    out = []
    for p in paths:
        with open(p, encoding="utf-8", errors="replace") as f:
            out.append((os.path.basename(p), f.read()))
    if not out:
        raise SystemExit("no Python sources found in the standard library directory")
    return out


class Tokenizer:
    """Byte-level BPE (tokenizers) or plain bytes; one end-of-file token separates files."""

    EOF = "<|endoftext|>"

    def __init__(self, texts: list[str], vocab: int):
        self.bpe = None
        if vocab:
            try:
                from tokenizers import Tokenizer as HFTokenizer
                from tokenizers import decoders, models, pre_tokenizers, trainers
            except ImportError:
                print("tokenizers is not installed: using plain bytes")
                vocab = 0
        if vocab:
            tok = HFTokenizer(models.BPE())
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
            tok.decoder = decoders.ByteLevel()
            trainer = trainers.BpeTrainer(
                vocab_size=vocab,
                min_frequency=2,
                special_tokens=[self.EOF],
                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                show_progress=False,
            )
            tok.train_from_iterator(texts, trainer)
            self.bpe = tok
            self.kind = "byte-level BPE"
            self.vocab_size = tok.get_vocab_size()
            self.eof = tok.token_to_id(self.EOF)
            # a byte-level token's string has one character per byte
            self.nbytes = [
                0 if i == self.eof else len(tok.id_to_token(i)) for i in range(self.vocab_size)
            ]
        else:
            self.kind = "bytes"
            self.vocab_size = 257
            self.eof = 256
            self.nbytes = [1] * 256 + [0]

    def stream(self, texts: list[str]) -> torch.Tensor:
        """All texts as one id stream, each followed by the end-of-file token."""
        ids: list[int] = []
        if self.bpe is not None:
            for enc in self.bpe.encode_batch(texts):
                ids += enc.ids + [self.eof]
        else:
            for t in texts:
                ids += list(t.encode("utf-8")) + [self.eof]
        return torch.tensor(ids, dtype=torch.int64)


class PretrainedTokenizer:
    """The teacher's own tokenizer (--teacher)."""

    def __init__(self, name: str):
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(name)
        self.kind = f"{name} tokenizer"
        self.vocab_size = len(self.tok)
        self.eof = self.tok.eos_token_id if self.tok.eos_token_id is not None else 0
        self.nbytes = None  # bits per byte are counted from the decoded text

    def stream(self, texts: list[str]) -> torch.Tensor:
        ids: list[int] = []
        for t in texts:
            ids += self.tok(t, add_special_tokens=False)["input_ids"] + [self.eof]
        return torch.tensor(ids, dtype=torch.int64)


def window_bytes(tok, windows: torch.Tensor) -> int:
    """UTF-8 bytes of the predicted tokens (all but the first of each window)."""
    if tok.nbytes is not None:
        table = torch.tensor(tok.nbytes, dtype=torch.int64)
        return int(table[windows[:, 1:]].sum())
    return sum(len(tok.tok.decode(w[1:].tolist()).encode("utf-8")) for w in windows)


# --------------------------------------------------------------------------- models
def llama(vocab: int, hidden: int, layers: int, seq: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=8 * hidden // 3 // 32 * 32,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 32),
        num_key_value_heads=max(1, hidden // 32),
        max_position_embeddings=seq,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg)


def load(name: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32)


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------- losses
def loss_hard(student, teacher, ids, cfg):
    return student(input_ids=ids, labels=ids).loss


def loss_kd(student, teacher, ids, cfg):
    s = student(input_ids=ids).logits
    with torch.no_grad():
        t = teacher(input_ids=ids).logits
    # Row-strided views: kd_loss reads logits[:, :-1] in place.
    return kdfused.kd_loss(
        s[:, :-1],
        t[:, :-1],
        ids[:, 1:],
        temperature=cfg.temperature,
        soft_weight=cfg.soft_weight,
        hard_weight=cfg.hard_weight,
    )


def loss_linear(student, teacher, ids, cfg):
    # The decoder (the model without lm_head) gives the last hidden states, after the final norm;
    # lm_head is folded into the loss.
    h = student.get_decoder()(input_ids=ids).last_hidden_state
    with torch.no_grad():
        th = teacher.get_decoder()(input_ids=ids).last_hidden_state
    head, t_head = student.get_output_embeddings(), teacher.get_output_embeddings()
    return kdfused.linear_kd_loss(
        h[:, :-1],
        head.weight,
        th[:, :-1],
        t_head.weight.detach(),
        ids[:, 1:],
        student_bias=head.bias,
        teacher_bias=None if t_head.bias is None else t_head.bias.detach(),
        temperature=cfg.temperature,
        soft_weight=cfg.soft_weight,
        hard_weight=cfg.hard_weight,
        chunk_size=cfg.chunk_size or None,
    )


def loss_eager(student, teacher, ids, cfg):
    """The formula people write, for a first-step check of the other two."""
    s = student(input_ids=ids).logits[:, :-1].flatten(0, 1)
    with torch.no_grad():
        t = teacher(input_ids=ids).logits[:, :-1].flatten(0, 1)
    T = cfg.temperature
    kl = F.kl_div(
        F.log_softmax(s / T, -1), F.log_softmax(t / T, -1), reduction="batchmean", log_target=True
    )
    y = ids[:, 1:].flatten()
    return cfg.soft_weight * T * T * kl + cfg.hard_weight * F.cross_entropy(s, y)


LOSSES = {"hard": loss_hard, "kd_loss": loss_kd, "linear": loss_linear}


# --------------------------------------------------------------------------- measuring
# --------------------------------------------------------------------------- training
def schedule(opt, steps: int):
    """Linear warm-up over 10% of the steps, then cosine decay to 10% of the learning rate."""
    warm = max(1, steps // 10)

    def f(i):
        if i < warm:
            return (i + 1) / warm
        return 0.1 + 0.45 * (1 + math.cos(math.pi * (i - warm) / max(1, steps - warm)))

    return torch.optim.lr_scheduler.LambdaLR(opt, f)


def optimizer(model, lr: float, steps: int):
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    return opt, schedule(opt, steps)


def batches(stream: torch.Tensor, steps: int, batch: int, seq: int, seed: int) -> torch.Tensor:
    """(steps, batch, seq) random windows of the training stream."""
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(stream) - seq, (steps, batch), generator=g)
    return stream[starts[..., None] + torch.arange(seq)]


@torch.no_grad()
def held_out_ce(model, windows: torch.Tensor, chunk: int = 16) -> float:
    """Mean next-token cross-entropy (nats) over every predicted token of the windows."""
    was = model.training
    model.eval()
    total, count = 0.0, 0
    for w in windows.split(chunk):
        logits = model(input_ids=w).logits[:, :-1]
        total += F.cross_entropy(logits.flatten(0, 1), w[:, 1:].flatten(), reduction="sum").item()
        count += w[:, 1:].numel()
    model.train(was)
    return total / count


def train_step(model, opt, sched, fn, teacher, ids, cfg) -> tuple[float, float, float]:
    """One optimizer step; (loss, seconds, peak MiB above the resident set before it)."""
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = fn(model, teacher, ids, cfg)
        loss.backward()
        opt.step()
        sched.step()
        dt = time.perf_counter() - t0
    return loss.item(), dt, mem.mib


def _freeze() -> None:
    """Move every object alive now (modules, models) out of the collector's reach, so that the
    collection before each measured step (PeakRSS) takes microseconds, not a second."""
    gc.collect()
    gc.freeze()


def evaluation(ce: float, n_tokens: int, n_bytes: int) -> dict:
    return {
        "ce": ce,
        "perplexity": math.exp(ce),
        "bits_per_byte": ce * n_tokens / (math.log(2) * n_bytes),
    }


def median(xs):
    xs = sorted(xs)
    n = len(xs)
    return 0.5 * (xs[(n - 1) // 2] + xs[n // 2]) if n else float("nan")


# --------------------------------------------------------------------------- the experiment
def run(cfg: Config, teacher_name=None, student_name=None, verbose=True) -> dict:
    t_all = time.perf_counter()
    cpu0 = cpu_seconds()
    load_start = loadavg()
    say = print if verbose else (lambda *a, **k: None)

    # 1. corpus and tokenizer
    modules = stdlib_modules(cfg.files)
    k = cfg.held_out_every
    held = [m for i, m in enumerate(modules) if i % k == k - 1]
    train = [m for i, m in enumerate(modules) if i % k != k - 1]
    t0 = time.perf_counter()
    if teacher_name:
        tok = PretrainedTokenizer(teacher_name)
    else:
        tok = Tokenizer([t for _, t in train], cfg.vocab)
    train_ids = tok.stream([t for _, t in train])
    held_ids = tok.stream([t for _, t in held])
    tok_s = time.perf_counter() - t0
    n_win = len(held_ids) // cfg.seq
    pick = torch.linspace(0, n_win - 1, min(cfg.eval_windows, n_win)).round().long()
    windows = held_ids[: n_win * cfg.seq].view(n_win, cfg.seq)[pick]
    n_eval_tokens = windows[:, 1:].numel()
    n_eval_bytes = window_bytes(tok, windows)
    corpus = {
        "source": f"Python {platform.python_version()} standard library, top-level *.py modules",
        "train_files": len(train),
        "held_out_files": [name for name, _ in held],
        "train_bytes": sum(len(t.encode("utf-8")) for _, t in train),
        "train_tokens": len(train_ids),
        "held_out_tokens": len(held_ids),
        "eval_windows": len(windows),
        "eval_tokens": n_eval_tokens,
        "eval_bytes": n_eval_bytes,
    }
    V = tok.vocab_size
    say(
        f"corpus: {len(train)} stdlib modules for training ({corpus['train_bytes'] / 1e6:.2f} MB, "
        f"{len(train_ids)} tokens), {len(held)} held out ({len(held_ids)} tokens); "
        f"{tok.kind}, V = {V} ({tok_s:.1f} s)"
    )

    # 2. teacher
    if teacher_name:
        teacher = load(teacher_name)
    else:
        teacher = llama(V, cfg.teacher_hidden, cfg.teacher_layers, cfg.seq, cfg.seed + 1)
    if teacher.get_output_embeddings().weight.shape[0] < V:
        raise SystemExit("the teacher's vocabulary is smaller than its tokenizer's")
    V = teacher.get_output_embeddings().weight.shape[0]
    t_hist = {"loss": [], "step_seconds": [], "peak_mib": [], "eval": []}
    _freeze()
    if not teacher_name and cfg.teacher_steps:
        opt, sched = optimizer(teacher, cfg.teacher_lr, cfg.teacher_steps)
        tb = batches(train_ids, cfg.teacher_steps, cfg.batch, cfg.seq, cfg.seed + 11)
        teacher.train()
        for i, ids in enumerate(tb):
            loss, dt, mib = train_step(teacher, opt, sched, loss_hard, None, ids, cfg)
            t_hist["loss"].append(loss)
            t_hist["step_seconds"].append(dt)
            t_hist["peak_mib"].append(mib)
            if (i + 1) % cfg.eval_every == 0 or i + 1 == cfg.teacher_steps:
                ce = held_out_ce(teacher, windows)
                t_hist["eval"].append([i + 1, ce])
                say(
                    f"teacher step {i + 1:4d}  loss {loss:.4f}  held-out ppl {math.exp(ce):8.2f}"
                    f"  {dt:.2f} s/step"
                )
        del opt, sched
    teacher.eval().requires_grad_(False)
    t_ce = held_out_ce(teacher, windows)
    t_hist["final"] = evaluation(t_ce, n_eval_tokens, n_eval_bytes)
    t_hist["params"] = n_params(teacher)

    # 3. students: one initialisation, the same batches, in lockstep
    if student_name:
        student0 = load(student_name)
    else:
        student0 = llama(V, cfg.student_hidden, cfg.student_layers, cfg.seq, cfg.seed + 2)
    if student0.get_output_embeddings().weight.shape[0] != V:
        raise SystemExit("teacher and student must share the vocabulary")
    sb = batches(train_ids, cfg.student_steps, cfg.batch, cfg.seq, cfg.seed + 12)
    first = {
        "eager": loss_eager(student0, teacher, sb[0], cfg).item(),
        "kd_loss_no_grad": None,
    }
    with torch.no_grad():
        first["kd_loss_no_grad"] = loss_kd(student0, teacher, sb[0], cfg).item()
        first["linear_no_grad"] = loss_linear(student0, teacher, sb[0], cfg).item()
    ce0 = held_out_ce(student0, windows)
    students, opts = {}, {}
    hist = {}
    for way in WAYS:
        students[way] = copy.deepcopy(student0).train()
        opts[way] = optimizer(students[way], cfg.student_lr, cfg.student_steps)
        hist[way] = {"loss": [], "step_seconds": [], "peak_mib": [], "eval": [[0, ce0]]}
    _freeze()
    for i, ids in enumerate(sb):
        order = WAYS[i % 3 :] + WAYS[: i % 3]  # rotate, so that no way always runs first
        for way in order:
            opt, sched = opts[way]
            loss, dt, mib = train_step(students[way], opt, sched, LOSSES[way], teacher, ids, cfg)
            h = hist[way]
            h["loss"].append(loss)
            h["step_seconds"].append(dt)
            h["peak_mib"].append(mib)
        if (i + 1) % cfg.eval_every == 0 or i + 1 == cfg.student_steps:
            line = f"student step {i + 1:4d}"
            for way in WAYS:
                ce = held_out_ce(students[way], windows)
                hist[way]["eval"].append([i + 1, ce])
                line += f"  {way} {hist[way]['loss'][-1]:.4f} (ppl {math.exp(ce):.2f})"
            say(line)
    for way in WAYS:
        h = hist[way]
        h["final"] = evaluation(h["eval"][-1][1], n_eval_tokens, n_eval_bytes)
        h["median_step_seconds"] = median(h["step_seconds"][1:])
        h["mean_step_seconds"] = sum(h["step_seconds"][1:]) / max(1, len(h["step_seconds"]) - 1)
        peaks = [m for m in h["peak_mib"] if m is not None]
        h["peak_mib_max"] = max(peaks) if peaks else None
        h["peak_mib_median"] = median(peaks) if peaks else None

    # 4. the two kdfused ways: the same training
    a, b = hist["kd_loss"]["loss"], hist["linear"]["loss"]
    diffs = [abs(x - y) for x, y in zip(a, b)]
    rel = [d / abs(x) for d, x in zip(diffs, a)]
    pa = dict(students["kd_loss"].named_parameters())
    pb = dict(students["linear"].named_parameters())
    with torch.no_grad():
        pmax, pname = max((float((pb[n] - p).abs().max()), n) for n, p in pa.items())
        num = sum(float((pb[n] - p).double().pow(2).sum()) for n, p in pa.items())
        den = sum(float(p.double().pow(2).sum()) for p in pa.values())
    agreement = {
        "first_step_abs_diff": diffs[0],
        "first_step_rel_diff": rel[0],
        "max_abs_diff": max(diffs),
        "max_rel_diff": max(rel),
        "max_rel_diff_step": rel.index(max(rel)) + 1,
        "final_perplexity_kd_loss": hist["kd_loss"]["final"]["perplexity"],
        "final_perplexity_linear": hist["linear"]["final"]["perplexity"],
        "final_max_abs_param_diff": pmax,
        "final_max_abs_param_diff_name": pname,
        "final_param_rel_norm_diff": math.sqrt(num / den),
        "first_step_eager": first["eager"],
        "first_step_eager_rel_diff": abs(first["eager"] - a[0]) / abs(a[0]),
        "first_step_no_grad": {k: v for k, v in first.items() if k != "eager"},
    }
    say(
        f"kd_loss vs linear: first step {a[0]:.7f} vs {b[0]:.7f} (|diff| {diffs[0]:.1e}); "
        f"over {len(a)} steps max |diff| {max(diffs):.2e} (relative {max(rel):.1e}); "
        f"eager first step {first['eager']:.7f}"
    )

    logits_mib = cfg.batch * (cfg.seq - 1) * V * 4 / MIB
    wall = time.perf_counter() - t_all
    return {
        "config": asdict(cfg),
        "teacher_model": teacher_name or "LlamaConfig",
        "student_model": student_name or "LlamaConfig",
        "corpus": corpus,
        "tokenizer": {"kind": tok.kind, "vocab_size": V, "seconds": round(tok_s, 2)},
        "teacher": t_hist,
        "student_params": n_params(student0),
        "student_initial": evaluation(ce0, n_eval_tokens, n_eval_bytes),
        "students": hist,
        "agreement": agreement,
        "logits_mib_per_tensor": logits_mib,
        "memory_method": (
            "per step: peak resident set (VmHWM, reset through /proc/self/clear_refs) minus the "
            "resident set just before the step, after gc, malloc_trim and kdfused.empty_cache()"
        ),
        "environment": {
            "torch": torch.__version__,
            "transformers": _version("transformers"),
            "tokenizers": _version("tokenizers"),
            "python": platform.python_version(),
            "kdfused": _version("kdfused"),
            "cpu": cpu_model(),
            "cpu_count": os.cpu_count(),
            "threads": torch.get_num_threads(),
            "load_average_start": load_start,
            "load_average_end": loadavg(),
        },
        "wall_seconds": round(wall, 1),
        "cpu_seconds": round(cpu_seconds() - cpu0, 1),
    }


def _version(mod: str):
    try:
        return __import__(mod).__version__
    except (ImportError, AttributeError):
        return None


# --------------------------------------------------------------------------- report
LABELS = {
    "hard": "hard labels only",
    "kd_loss": "kdfused.kd_loss on logits",
    "linear": "kdfused.linear_kd_loss on hidden states",
}


def table(out: dict) -> str:
    t = out["teacher"]
    rows = [
        "| model | training | held-out ppl | bits/byte | time/step (median) | peak MiB/step |",
        "|---|---|---:|---:|---:|---:|",
    ]
    tt = f"{median(t['step_seconds'][1:]) * 1e3:.0f} ms" if t["step_seconds"][1:] else "-"
    tp = max((m for m in t["peak_mib"] if m is not None), default=None)
    how = f"hard labels, {len(t['loss'])} steps" if t["loss"] else "pretrained, not trained here"
    rows.append(
        f"| teacher ({t['params'] / 1e6:.2f}M) | {how} | "
        f"{t['final']['perplexity']:.2f} | {t['final']['bits_per_byte']:.3f} | {tt} | {_mib(tp)} |"
    )
    s0 = out["student_initial"]
    rows.append(
        f"| student ({out['student_params'] / 1e6:.2f}M) | untrained | {s0['perplexity']:.1f} | "
        f"{s0['bits_per_byte']:.3f} | - | - |"
    )
    for way in WAYS:
        h = out["students"][way]
        rows.append(
            f"| student | {LABELS[way]} | {h['final']['perplexity']:.2f} | "
            f"{h['final']['bits_per_byte']:.3f} | {h['median_step_seconds'] * 1e3:.0f} ms | "
            f"{_mib(h['peak_mib_max'])} |"
        )
    return "\n".join(rows)


def _mib(x):
    return "-" if x is None else f"{x:.0f}"


def markdown(out: dict, command: str) -> str:
    c, ag, env, co = out["config"], out["agreement"], out["environment"], out["corpus"]
    n = c["student_steps"]
    return (
        f"{table(out)}\n\n"
        f"Corpus: {co['source']}: {co['train_files']} modules for training "
        f"({co['train_bytes'] / 1e6:.2f} MB, {co['train_tokens']} tokens), "
        f"{len(co['held_out_files'])} held out (every {c['held_out_every']}th by name; "
        f"perplexity on {co['eval_windows']} windows of {c['seq']} tokens, {co['eval_tokens']} "
        f"predicted tokens, {co['eval_bytes']} bytes). Tokenizer: {out['tokenizer']['kind']}, "
        f"V = {out['tokenizer']['vocab_size']}. {_models(out)} AdamW (betas 0.9, 0.95), lr "
        f"{c['teacher_lr']:g} (teacher) / {c['student_lr']:g} (students), 10% warm-up, cosine "
        f"decay to 10%; batch {c['batch']} x {c['seq']} tokens; teacher {c['teacher_steps']} "
        f"steps, each student {n} steps on the same batches, from the same initialisation. "
        f"Distillation: T = {c['temperature']:g}, {c['soft_weight']:g} soft (T^2 KL) + "
        f"{c['hard_weight']:g} hard; linear_kd_loss with chunk_size "
        f"{c['chunk_size'] or 'automatic'} "
        f"(rows per chunk, of {c['batch'] * (c['seq'] - 1)} rows per step). Seed {c['seed']}.\n\n"
        f"The two kdfused ways train the same: first-step losses "
        f"{out['students']['kd_loss']['loss'][0]:.7f} (kd_loss) and "
        f"{out['students']['linear']['loss'][0]:.7f} (linear), |difference| "
        f"{ag['first_step_abs_diff']:.1e} (eager F.kl_div + F.cross_entropy: "
        f"{ag['first_step_eager']:.7f}); over the {n} steps the losses differ by at most "
        f"{ag['max_abs_diff']:.1e} (relative {ag['max_rel_diff']:.1e}, step "
        f"{ag['max_rel_diff_step']}); final held-out perplexity "
        f"{ag['final_perplexity_kd_loss']:.4f} vs {ag['final_perplexity_linear']:.4f}; largest "
        f"parameter difference after training {ag['final_max_abs_param_diff']:.1e}"
        f"{_param_note(ag)}.\n\n"
        f"Time per step: median over steps 2 to {n} of forward (student, and the teacher for the "
        f"distillations), loss, backward and optimizer step; the three students ran in lockstep "
        f"(one step of each in turn), so all three saw the same machine load. Peak memory: "
        f"{out['memory_method']}; one student logits tensor is "
        f"{out['logits_mib_per_tensor']:.1f} MiB here.\n\n"
        f"Command: `{command}`. CPU: {env['cpu']}, {env['cpu_count']} cores, {env['threads']} "
        f"threads; torch {env['torch']}, transformers {env['transformers']}, tokenizers "
        f"{env['tokenizers']}, Python {env['python']}. Load average (1, 5, 15 min) "
        f"{env['load_average_start']} at the start, {env['load_average_end']} at the end; "
        f"whole run {out['wall_seconds'] / 60:.1f} min{_cpu_note(out)}.\n"
    )


def _cpu_note(out: dict) -> str:
    if "cpu_seconds" not in out:
        return ""
    return (
        f", of which it had {out['cpu_seconds'] / 60:.1f} min of CPU time (about the time it needs "
        f"with {out['environment']['threads']} thread(s) on a machine to itself)"
    )


def _models(out: dict) -> str:
    c = out["config"]
    if out["teacher_model"] != "LlamaConfig" or out["student_model"] != "LlamaConfig":
        return f"Teacher: {out['teacher_model']}; student: {out['student_model']}."
    return (
        f"Teacher: Llama, {c['teacher_layers']} layers, hidden {c['teacher_hidden']}; student: "
        f"{c['student_layers']} layers, hidden {c['student_hidden']}; untied lm_head."
    )


def _param_note(ag: dict) -> str:
    if "final_param_rel_norm_diff" not in ag:
        return ""
    return (
        f" (in {ag['final_max_abs_param_diff_name']}; over all parameters, |difference| / "
        f"|parameters| = {ag['final_param_rel_norm_diff']:.1e})"
    )


def plot(out: dict, path: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(2, 2, figsize=(11, 8))
    t = out["teacher"]
    ax[0, 0].plot(range(1, len(t["loss"]) + 1), t["loss"], color="k", lw=0.8, label="train")
    if t["eval"]:
        ax[0, 0].plot(*zip(*t["eval"]), "o-", color="C3", label="held-out")
    ax[0, 0].set(title="teacher: cross-entropy", xlabel="step", ylabel="nats/token")
    ax[0, 0].legend()
    styles = {"hard": ("C0", "-", 1.0), "kd_loss": ("C1", "-", 2.5), "linear": ("C2", "--", 1.0)}
    for way in WAYS:
        h = out["students"][way]
        col, ls, lw = styles[way]
        ax[0, 1].plot(range(1, len(h["loss"]) + 1), h["loss"], ls, color=col, lw=lw, label=way)
        steps, ce = zip(*h["eval"])
        ax[1, 0].plot(steps, [math.exp(x) for x in ce], ls, color=col, lw=lw, marker="o", ms=3)
    ax[0, 1].set(
        title="students: training loss (hard: CE; kd: 0.5 T^2 KL + 0.5 CE)",
        xlabel="step",
        ylabel="loss",
    )
    ax[0, 1].legend()
    ax[1, 0].axhline(t["final"]["perplexity"], color="k", lw=0.8, ls=":", label="teacher")
    ax[1, 0].set(
        title="students: held-out perplexity",
        xlabel="step",
        ylabel="perplexity",
        yscale="log",
    )
    ax[1, 0].legend(list(WAYS) + ["teacher"])
    a, b = out["students"]["kd_loss"]["loss"], out["students"]["linear"]["loss"]
    d = [max(abs(x - y), 1e-9) for x, y in zip(a, b)]
    ax[1, 1].semilogy(range(1, len(d) + 1), d, color="C4", lw=0.8)
    ax[1, 1].set(
        title="|loss(kd_loss) - loss(linear)| per step (0 drawn at 1e-9)",
        xlabel="step",
        ylabel="absolute difference",
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write(out: dict, outdir: str, command: str) -> None:
    os.makedirs(outdir, exist_ok=True)
    out = dict(out, command=command)
    with open(os.path.join(outdir, "llm_distill.json"), "w") as f:
        json.dump(out, f, indent=1)
    with open(os.path.join(outdir, "llm_distill.md"), "w") as f:
        f.write(markdown(out, command))
    plot(out, os.path.join(outdir, "llm_distill.png"))


def add_config_options(ap: argparse.ArgumentParser, config_cls) -> None:
    """--quick, and an option --field-name for every field of the dataclass config_cls (its
    default as the help; unset unless given)."""
    ap.add_argument("--quick", action="store_true", help="tiny models, a few steps (smoke test)")
    for field, default in asdict(config_cls()).items():
        ap.add_argument(
            "--" + field.replace("_", "-"), type=type(default), default=None, help=f"{default}"
        )


def config_from_args(config_cls, quick: dict, args):
    """config_cls's defaults, with the values of `quick` under --quick, then the options given."""
    cfg = replace(config_cls(), **quick) if args.quick else config_cls()
    given = {f: getattr(args, f) for f in asdict(cfg) if getattr(args, f) is not None}
    return replace(cfg, **given)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--teacher", help="HF model name/path (default: a Llama trained here)")
    ap.add_argument("--student", help="HF model name/path (default: a smaller Llama)")
    add_config_options(ap, Config)
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: these small matrices gain little from more, and on a\n"
        "shared machine a second thread waiting for a busy core slows every op; 0: torch's)",
    )
    ap.add_argument(
        "--out",
        default=None,
        help="directory for llm_distill.{json,md,png} (default: examples/results, none with "
        "--quick)",
    )
    ap.add_argument(
        "--replot", metavar="JSON", help="only rewrite the .md and .png of a results JSON"
    )
    args = ap.parse_args(argv)
    if args.replot:
        with open(args.replot) as f:
            out = json.load(f)
        write(out, os.path.dirname(os.path.abspath(args.replot)), out["command"])
        print(table(out))
        return out
    cfg = config_from_args(Config, QUICK, args)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = run(cfg, args.teacher, args.student)
    here = os.path.dirname(os.path.abspath(__file__))
    outdir = args.out or (None if args.quick else os.path.join(here, "results"))
    command = "python examples/llm_distill.py" + "".join(
        " " + a for a in (argv if argv is not None else sys.argv[1:])
    )
    if outdir:
        write(out, outdir, command)
        print(f"wrote {os.path.join(outdir, 'llm_distill')}.{{json,md,png}}")
    print(table(out))
    print(f"whole run {out['wall_seconds']:.1f} s, CPU time {out['cpu_seconds']:.1f} s")
    ag = out["agreement"]
    if ag["first_step_rel_diff"] > 1e-5 or ag["first_step_eager_rel_diff"] > 1e-5:
        raise SystemExit("the first-step losses disagree")
    return out


if __name__ == "__main__":
    main()
