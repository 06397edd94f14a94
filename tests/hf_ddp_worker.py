"""One process of the KDTrainer DDP test (tests/test_integration_transformers.py starts two).

    RANK=r WORLD_SIZE=2 LOCAL_RANK=r MASTER_ADDR=127.0.0.1 MASTER_PORT=p \
        python tests/hf_ddp_worker.py OUT_JSON SEED

Every process builds the same float64 student, teacher and 4 rows (unequal valid tokens) from
SEED; the Trainer (CPU, gloo) runs one SGD step with 1 row per process and 2 accumulation steps,
so the step sees all 4 rows. Rank 0 writes the largest difference between the trained student
and one SGD step on the loss of the whole batch (its sum over the valid tokens / their count),
computed in this process without DDP.
"""

from __future__ import annotations

import copy
import json
import os
import sys
import traceback

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)


def main(out_path: str, seed: int) -> None:
    import transformers
    from test_integration_transformers import _dataset, _model, _reference

    from kdfused.integrations.transformers import KDTrainer

    torch.manual_seed(seed)
    teacher = _model("llama", hidden=48)
    student = _model("llama")
    before = copy.deepcopy(student)
    gen = torch.Generator().manual_seed(seed + 1)
    data = _dataset(gen)
    lr, kw = 0.5, dict(temperature=2.0, soft_weight=0.7, hard_weight=0.4)
    args = transformers.TrainingArguments(
        output_dir=os.path.join(os.path.dirname(out_path), f"rank{os.environ['RANK']}"),
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        per_device_train_batch_size=1,
        gradient_accumulation_steps=2,
        max_steps=1,
        learning_rate=lr,
        optim="sgd",
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=0.0,
        train_sampling_strategy="sequential",
        ddp_backend="gloo",
        ddp_find_unused_parameters=False,
    )
    trainer = KDTrainer(student, teacher, args, train_dataset=data, **kw)
    trainer.train()
    world = trainer.accelerator.num_processes
    if trainer.accelerator.process_index != 0:
        return
    full = {k: torch.stack([d[k] for d in data]) for k in data[0]}
    full["attention_mask"] = torch.ones_like(full["input_ids"])
    loss = _reference(before, teacher, full, divergence="kl", beta=0.5, T=2.0, soft=0.7, hard=0.4)
    loss.backward()
    diff, moved = 0.0, 0.0
    for pa, pr in zip(student.parameters(), before.parameters()):
        want = pr.detach() - lr * pr.grad
        diff = max(diff, float((pa.detach() - want).abs().max() / want.abs().max()))
        moved = max(moved, float((pa.detach() - pr.detach()).abs().max()))
    with open(out_path, "w") as f:
        json.dump({"world": world, "max_rel_diff": diff, "moved": moved}, f)


if __name__ == "__main__":
    try:
        main(sys.argv[1], int(sys.argv[2]))
    except Exception:
        traceback.print_exc()
        sys.exit(1)
