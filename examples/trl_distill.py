"""TRL's DistillationTrainer two ways: its own loss, and kdfused's (``kdfused.integrations.trl``).

On-policy distillation with TRL 1.16's ``DistillationTrainer``: the student samples completions
of the prompts, and is trained to match the teacher's next-token distributions on them (the
generalised JSD, beta = 0.5). Run twice from the same initial weights, data and seed:

    trl      ``trl.DistillationTrainer``: TRL's ``_chunked_divergence_loss``. On the CPU that is
             the plain-PyTorch stand-in for its Triton kernels (which are for CUDA): logits
             tiles of up to 4096 tokens x 32768 vocabulary columns per side, and whole-tile
             torch temporaries of the same size; so this compares with TRL's CPU path, not
             with its GPU kernels
    kdfused  ``kdfused.integrations.trl.DistillationTrainer``: the same trainer, the loss
             computed by one ``kdfused.linear_kd_loss`` call (no tokens x V logits)

Each way runs in its own process (``--worker``), one after the other, so that each process's
peak memory is its own. Reported per step: the loss (the two ways must agree: the same sampled
completions, the losses to ``--rtol``); the wall time of the optimizer step (generation, both
forwards, the loss and backward, the optimizer) and of the loss alone (its forward, and its
backward from the loss to the gradient of the student's hidden states, timed by tensor hooks);
the process's CPU time (user + system, all threads) of both, less sensitive than the wall time
to other work on the machine; and the step's peak resident memory above the resident set at
its start (Linux ``VmHWM``, reset at the start of each step; see benchmarks/_procinfo.py).
Medians leave out the first step (one-time allocations). Results: ``--out``/trl_distill.{json,md}
(``trl_distill_quick.*`` with ``--quick``).

Models and data are built here, nothing is downloaded: Llama student and teacher from
``LlamaConfig``s (vocabulary V, the teacher wider than the student), a character-level tokenizer
(``tokenizers`` WordLevel in ``PreTrainedTokenizerFast``, left padding; the models' vocabulary
is larger than the tokenizer's, which the trainer does not mind: the completions are token ids),
and plain-text prompts. Float32 on the CPU, no gradient checkpointing, AdamW, constant learning
rate.

    pip install trl==1.16.0        # brings transformers, datasets, accelerate, tokenizers
    python examples/trl_distill.py             # V = 32000, 8 x 128 completion tokens per step
    python examples/trl_distill.py --quick     # tiny models, a smoke run (well under a minute)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
WAYS = ("trl", "kdfused")
MIB = float(1 << 20)


@dataclass
class Config:
    vocab: int = 32000
    student_layers: int = 2
    student_hidden: int = 256
    teacher_layers: int = 2
    teacher_hidden: int = 512
    batch: int = 8  # prompts per step
    completion: int = 128  # tokens sampled per prompt (max_completion_length)
    steps: int = 6
    learning_rate: float = 1e-4
    beta: float = 0.5
    temperature: float = 1.0
    init_range: float = 0.05  # LlamaConfig.initializer_range: logits some way from uniform
    threads: int = 2
    seed: int = 0
    rtol: float = 1e-4  # per-step loss agreement asserted between the two ways


QUICK = dict(
    vocab=2048,
    student_layers=1,
    student_hidden=64,
    teacher_layers=1,
    teacher_hidden=96,
    batch=2,
    completion=16,
    steps=3,
)

WORDS = (
    "the cat sat on a mat and we saw red sun by sea it is far to go when you can see how old "
    "trees grow in warm rain so birds sing of light over quiet hills"
).split()


def prompts(n: int, seed: int) -> list[str]:
    import random

    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 8))) for _ in range(n)]


def tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

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


def model(cfg: Config, layers: int, hidden: int, seed: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=cfg.vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64 + cfg.completion,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=None,
        tie_word_embeddings=False,
        initializer_range=cfg.init_range,
    )
    return LlamaForCausalLM(config)


# --------------------------------------------------------------------------- one way (worker)
def run_way(way: str, cfg: Config, out_dir: str) -> dict:
    import warnings

    import torch

    torch.set_num_threads(cfg.threads)
    # TRL 1.16 reads a property that transformers 5 deprecates (not this script's doing)
    warnings.filterwarnings(
        "ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning
    )
    import trl
    import trl.trainer.distillation_trainer as trl_module
    from datasets import Dataset
    from transformers import TrainerCallback

    import kdfused.integrations.trl as kdfused_trl

    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from _procinfo import PeakRSS, cpu_seconds, status_kib

    loss_time = {"forward": 0.0, "backward": 0.0, "cpu": 0.0}

    def timed(fn):
        """The loss function, its forward and backward timed (the backward from the loss's
        incoming gradient to the student's hidden states' gradient)."""

        def wrapper(*args, **kwargs):
            t0, c0 = time.perf_counter(), cpu_seconds()
            out = fn(*args, **kwargs)
            loss_time["forward"] += time.perf_counter() - t0
            loss_time["cpu"] += cpu_seconds() - c0
            loss, hidden = out[0], args[0]
            if loss.requires_grad and hidden.requires_grad:
                start = []
                loss.register_hook(lambda g: start.append((time.perf_counter(), cpu_seconds())))

                def done(g):
                    loss_time["backward"] += time.perf_counter() - start[0][0]
                    loss_time["cpu"] += cpu_seconds() - start[0][1]

                hidden.register_hook(done)
            return out

        return wrapper

    # Both names are looked up at call time: TRL's _compute_loss reads its module's global, the
    # kdfused subclass binds that global to kdfused_trl.chunked_divergence_loss for the call.
    if way == "trl":
        trl_module._chunked_divergence_loss = timed(trl_module._chunked_divergence_loss)
        cls = trl.DistillationTrainer
    else:
        kdfused_trl.chunked_divergence_loss = timed(kdfused_trl.chunked_divergence_loss)
        cls = kdfused_trl.DistillationTrainer

    steps = []

    class Measure(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            loss_time.update(forward=0.0, backward=0.0, cpu=0.0)
            self.peak = PeakRSS().__enter__()
            self.t0, self.c0 = time.perf_counter(), cpu_seconds()

        def on_step_end(self, args, state, control, **kw):
            seconds, cpu = time.perf_counter() - self.t0, cpu_seconds() - self.c0
            self.peak.__exit__(None, None, None)
            steps.append(
                dict(
                    seconds=seconds,
                    cpu_seconds=cpu,
                    loss_forward_seconds=loss_time["forward"],
                    loss_backward_seconds=loss_time["backward"],
                    loss_cpu_seconds=loss_time["cpu"],
                    peak_mib=self.peak.mib,
                )
            )

    completions = []
    args = trl.DistillationConfig(
        output_dir=out_dir,
        use_cpu=True,
        report_to="none",
        per_device_train_batch_size=cfg.batch,
        gradient_accumulation_steps=1,
        max_steps=cfg.steps,
        max_completion_length=cfg.completion,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        seed=cfg.seed,
        beta=cfg.beta,
        temperature=cfg.temperature,
        bf16=False,
        activation_checkpointing=False,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    trainer = cls(
        model=model(cfg, cfg.student_layers, cfg.student_hidden, cfg.seed),
        teacher_model=model(cfg, cfg.teacher_layers, cfg.teacher_hidden, cfg.seed + 1),
        args=args,
        train_dataset=Dataset.from_list([{"prompt": p} for p in prompts(cfg.batch * cfg.steps, 0)]),
        processing_class=tokenizer(),
        callbacks=[Measure()],
    )
    generate = trainer._generate_and_score_completions

    def recording(inputs):
        out = generate(inputs)
        ids, mask = out["completion_ids"], out["completion_mask"]
        completions.append(dict(tokens=int(mask.sum()), ids=hash(tuple(ids.flatten().tolist()))))
        return out

    trainer._generate_and_score_completions = recording
    t0 = time.perf_counter()
    trainer.train()
    total = time.perf_counter() - t0
    logs = [h for h in trainer.state.log_history if "loss" in h and "train_loss" not in h]
    return dict(
        way=way,
        trainer=f"{cls.__module__}.{cls.__qualname__}",
        loss=[h["loss"] for h in logs],
        entropy=[h["entropy"] for h in logs],
        completion_tokens=[c["tokens"] for c in completions],
        completion_hash=[c["ids"] for c in completions],
        steps=steps,
        train_seconds=total,
        process_peak_mib=(status_kib("VmHWM") or 0) / 1024.0,
    )


# --------------------------------------------------------------------------- driver
def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def summary(res: dict) -> dict:
    later = res["steps"][1:] or res["steps"]
    return dict(
        median_step_seconds=median([s["seconds"] for s in later]),
        median_step_cpu_seconds=median([s["cpu_seconds"] for s in later]),
        median_loss_cpu_seconds=median([s["loss_cpu_seconds"] for s in later]),
        median_loss_seconds=median(
            [s["loss_forward_seconds"] + s["loss_backward_seconds"] for s in later]
        ),
        median_step_peak_mib=median([s["peak_mib"] for s in later]),
        max_step_peak_mib=max((s["peak_mib"] or 0) for s in res["steps"]),
        process_peak_mib=res["process_peak_mib"],
    )


def markdown(cfg: Config, results: dict, agreement: dict, command: str, machine: str) -> str:
    lines = [
        "| step | completion tokens | loss (trl) | loss (kdfused) | rel. diff "
        "| step s (trl) | step s (kdfused) | loss fwd+bwd s (trl) | loss fwd+bwd s (kdfused) "
        "| peak MiB (trl) | peak MiB (kdfused) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    a, b = results["trl"], results["kdfused"]
    for i, (sa, sb) in enumerate(zip(a["steps"], b["steps"])):
        la, lb = a["loss"][i], b["loss"][i]
        lines.append(
            f"| {i + 1} | {a['completion_tokens'][i]} | {la:.6g} | {lb:.6g} "
            f"| {abs(la - lb) / abs(la):.1e} "
            f"| {sa['seconds']:.2f} | {sb['seconds']:.2f} "
            f"| {sa['loss_forward_seconds'] + sa['loss_backward_seconds']:.3f} "
            f"| {sb['loss_forward_seconds'] + sb['loss_backward_seconds']:.3f} "
            f"| {sa['peak_mib']:.0f} | {sb['peak_mib']:.0f} |"
        )
    sa, sb = summary(a), summary(b)
    lines += [
        "",
        "| way | step s | step CPU s | loss fwd+bwd s | loss CPU s | step peak MiB "
        "| process peak MiB |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for way, s in (("trl", sa), ("kdfused", sb)):
        lines.append(
            f"| {way} | {s['median_step_seconds']:.2f} | {s['median_step_cpu_seconds']:.2f} "
            f"| {s['median_loss_seconds']:.3f} | {s['median_loss_cpu_seconds']:.3f} "
            f"| {s['median_step_peak_mib']:.0f} | {s['process_peak_mib']:.0f} |"
        )
    lines += [
        "",
        f"V = {cfg.vocab}; student {cfg.student_layers} layers x hidden {cfg.student_hidden}, "
        f"teacher {cfg.teacher_layers} x {cfg.teacher_hidden}; {cfg.batch} prompts x up to "
        f"{cfg.completion} sampled tokens per step, {cfg.steps} steps, beta = {cfg.beta}, "
        f"T = {cfg.temperature}, float32, {cfg.threads} threads. Medians without step 1 (CPU s: "
        "the process's user + system time, all threads). "
        f"Same completions both ways: {agreement['same_completions']}; largest relative loss "
        f"difference {agreement['max_rel_loss_diff']:.1e}. TRL's loss on the CPU is its "
        "plain-PyTorch stand-in for its CUDA (Triton) kernels.",
        "",
        f"Command: `{command}`. Machine: {machine}.",
        "",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny models and steps: a smoke run")
    p.add_argument("--out", default=os.path.join(HERE, "results"), help="output directory")
    p.add_argument("--steps", type=int)
    p.add_argument("--vocab", type=int)
    p.add_argument("--batch", type=int)
    p.add_argument("--completion", type=int, help="max_completion_length")
    p.add_argument("--threads", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--worker", choices=WAYS, help=argparse.SUPPRESS)
    p.add_argument("--config", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    a = p.parse_args(argv)

    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see examples/README.md (MNIST)
    if a.worker:
        cfg = Config(**json.loads(a.config))
        with tempfile.TemporaryDirectory() as tmp:
            res = run_way(a.worker, cfg, tmp)
        with open(a.result, "w") as f:
            json.dump(res, f)
        return 0

    cfg = replace(Config(), **QUICK) if a.quick else Config()
    for name in ("steps", "vocab", "batch", "completion", "threads", "seed"):
        if getattr(a, name) is not None:
            cfg = replace(cfg, **{name: getattr(a, name)})

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for way in WAYS:
            path = os.path.join(tmp, f"{way}.json")
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", way]
            cmd += ["--config", json.dumps(asdict(cfg)), "--result", path]
            print(f"[{way}] training {cfg.steps} steps ...", flush=True)
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
            with open(path) as f:
                results[way] = json.load(f)
            s = summary(results[way])
            print(
                f"[{way}] {time.perf_counter() - t0:.1f} s; losses "
                + " ".join(f"{x:.5g}" for x in results[way]["loss"])
                + f"; step {s['median_step_seconds']:.2f} s, loss {s['median_loss_seconds']:.3f} s,"
                f" step peak {s['median_step_peak_mib']:.0f} MiB (medians)",
                flush=True,
            )

    a_, b_ = results["trl"], results["kdfused"]
    rel = [abs(x - y) / abs(x) for x, y in zip(a_["loss"], b_["loss"])]
    agreement = dict(
        same_completions=a_["completion_hash"] == b_["completion_hash"],
        max_rel_loss_diff=max(rel),
        rel_loss_diff=rel,
        rtol=cfg.rtol,
    )
    sa, sb = summary(a_), summary(b_)
    command = "python examples/trl_distill.py" + (" --quick" if a.quick else "")
    if argv is None and len(sys.argv) > 1:
        command = "python examples/trl_distill.py " + " ".join(sys.argv[1:])
    machine = f"{platform.machine()} CPU, {os.cpu_count()} cores"
    try:
        sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
        from _procinfo import cpu_model, loadavg

        machine = f"{cpu_model()}, {os.cpu_count()} cores, load average {loadavg()}"
    except ImportError:
        pass
    import trl

    report = dict(
        config=asdict(cfg),
        trl_version=trl.__version__,
        agreement=agreement,
        summary={"trl": sa, "kdfused": sb},
        ways=results,
        command=command,
        machine=machine,
    )
    os.makedirs(a.out, exist_ok=True)
    stem = os.path.join(a.out, "trl_distill_quick" if a.quick else "trl_distill")
    with open(stem + ".json", "w") as f:
        json.dump(report, f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(markdown(cfg, results, agreement, command, machine))
    print(f"wrote {stem}.json and {stem}.md")
    print(
        f"median step: trl {sa['median_step_seconds']:.2f} s, kdfused "
        f"{sb['median_step_seconds']:.2f} s; loss fwd+bwd: trl {sa['median_loss_seconds']:.3f} s, "
        f"kdfused {sb['median_loss_seconds']:.3f} s; step peak: trl "
        f"{sa['median_step_peak_mib']:.0f} MiB, kdfused {sb['median_step_peak_mib']:.0f} MiB"
    )
    assert agreement["same_completions"], "the two ways sampled different completions"
    assert agreement["max_rel_loss_diff"] <= cfg.rtol, agreement
    return 0


if __name__ == "__main__":
    sys.exit(main())
