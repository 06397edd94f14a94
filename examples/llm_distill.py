"""Distil a causal LM into a smaller one, three ways, and check that they agree.

  eager    student(ids).logits and teacher(ids).logits, then F.kl_div + F.cross_entropy
  kd_loss  the same logits, then kdfused.kd_loss (one fused pass, gradients in the forward)
  linear   the models' last hidden states and lm_head weights, kdfused.linear_kd_loss: the
           N x V logits are never materialised (CPU only for now)

Each way trains a copy of the same student for a few steps on the same batches; the first step's
losses must agree to float32 precision, and the runs stay close. By default both models are small
randomly initialised Llama models (no download); --teacher / --student take Hugging Face model
names or paths (loaded with AutoModelForCausalLM.from_pretrained; they must share a vocabulary).

    pip install transformers
    python examples/llm_distill.py --steps 5
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
import torch.nn.functional as F

import kdfused

T, SOFT, HARD = 2.0, 0.5, 0.5


def tiny_llama(vocab: int, hidden: int, layers: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg)


def load(name: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(name, torch_dtype=torch.float32)


def loss_eager(student, teacher, ids, labels):
    s = student(input_ids=ids).logits[:, :-1]
    with torch.no_grad():
        t = teacher(input_ids=ids).logits[:, :-1]
    y = labels[:, 1:]
    valid = y != -100
    s, t, y = s[valid], t[valid], y[valid]  # rows of the valid positions
    kl = F.kl_div(
        F.log_softmax(s / T, -1), F.log_softmax(t / T, -1), reduction="batchmean", log_target=True
    )
    return SOFT * T * T * kl + HARD * F.cross_entropy(s, y)


def loss_kd(student, teacher, ids, labels):
    s = student(input_ids=ids).logits
    with torch.no_grad():
        t = teacher(input_ids=ids).logits
    # Row-strided views: kd_loss reads logits[:, :-1] in place.
    return kdfused.kd_loss(
        s[:, :-1], t[:, :-1], labels[:, 1:], temperature=T, soft_weight=SOFT, hard_weight=HARD
    )


def loss_linear(student, teacher, ids, labels):
    # The base model (without lm_head) gives the last hidden states; lm_head is folded into the
    # loss. (get_decoder() works across architectures that follow the usual layout.)
    h = student.get_decoder()(input_ids=ids).last_hidden_state
    with torch.no_grad():
        th = teacher.get_decoder()(input_ids=ids).last_hidden_state
    head, t_head = student.get_output_embeddings(), teacher.get_output_embeddings()
    return kdfused.linear_kd_loss(
        h[:, :-1],
        head.weight,
        th[:, :-1],
        t_head.weight.detach(),
        labels[:, 1:],
        student_bias=head.bias,
        teacher_bias=None if t_head.bias is None else t_head.bias.detach(),
        temperature=T,
        soft_weight=SOFT,
        hard_weight=HARD,
    )


WAYS = {"eager": loss_eager, "kd_loss": loss_kd, "linear": loss_linear}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--teacher", help="HF model name/path (default: a random 4-layer Llama)")
    ap.add_argument("--student", help="HF model name/path (default: a random 2-layer Llama)")
    ap.add_argument("--vocab", type=int, default=4000, help="vocabulary of the random models")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--lr", type=float, default=1e-3)
    args = ap.parse_args()

    teacher = load(args.teacher) if args.teacher else tiny_llama(args.vocab, 128, 4, seed=1)
    student0 = load(args.student) if args.student else tiny_llama(args.vocab, 64, 2, seed=2)
    teacher.eval().requires_grad_(False)
    V = student0.get_output_embeddings().weight.shape[0]
    if teacher.get_output_embeddings().weight.shape[0] != V:
        raise SystemExit("teacher and student must share the vocabulary")

    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(args.steps):
        ids = torch.randint(0, V, (args.batch, args.seq), generator=g)
        labels = ids.clone()
        labels[:, : args.seq // 8] = -100  # e.g. a prompt that is not trained on
        batches.append((ids, labels))

    history = {}
    for name, fn in WAYS.items():
        student = copy.deepcopy(student0).train()
        opt = torch.optim.SGD(student.parameters(), lr=args.lr)
        losses, t0 = [], time.perf_counter()
        for ids, labels in batches:
            opt.zero_grad(set_to_none=True)
            loss = fn(student, teacher, ids, labels)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        history[name] = losses
        print(
            f"{name:>8}: {time.perf_counter() - t0:6.2f} s  losses "
            + " ".join(f"{x:.5f}" for x in losses)
        )

    first = {k: v[0] for k, v in history.items()}
    spread = max(first.values()) - min(first.values())
    print(f"first-step losses agree to {spread:.2e}")
    if spread > 1e-4 * max(abs(x) for x in first.values()):
        raise SystemExit(f"the three losses disagree: {first}")


if __name__ == "__main__":
    main()
