"""Reporting of examples/mnist_distill.py: the paper's numbers, the comparison table (markdown,
CSV), the notes on the run, the JSON and the training-curve plot."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

MYTHICAL = 3  # the class left out of the transfer set

# Hinton, Vinyals & Dean (2015), section 3: test errors out of 10,000 (and on the 1010 test 3s).
PAPER = {
    "teacher": (67, None),
    "student_hard": (146, None),
    "distilled_soft": (74, None),
    "distilled_soft_hard": (None, None),
    "distilled_reference": (74, None),
    "mythical": (206, 133),
    "mythical_bias_3.5": (109, 14),
    "mythical_bias_heldout": (None, None),
}
DESCRIPTION = {  # formatted with the run's config and the row's result
    "teacher": "teacher {teacher_hidden}-{teacher_hidden}, dropout + max-norm + {jitter}px jitter",
    "student_hard": "student {student_hidden}-{student_hidden}, hard labels only",
    "distilled_soft": "student {student_hidden}-{student_hidden}, kdfused T={temperature:g}, "
    "soft only",
    "distilled_soft_hard": "student {student_hidden}-{student_hidden}, kdfused T={temperature:g}, "
    "soft {soft_weight:g} + hard {hard_weight:g}",
    "distilled_reference": "same as soft only, with kdfused.reference as the loss",
    "mythical": "mythical 3: soft only, no 3s in the transfer set",
    "mythical_bias_3.5": "mythical 3, class-3 bias +3.5 (the paper's shift)",
    "mythical_bias_heldout": "mythical 3, class-3 bias +{bias_shift:.1f} (chosen on held-out data)",
}


def table_rows(out: dict) -> list[dict]:
    """One row per result: model, ours and the paper's errors (total and on the test 3s)."""
    rows = []
    for key, r in out["results"].items():
        paper, paper3 = PAPER[key]
        rows.append(
            {
                "key": key,
                "model": DESCRIPTION[key].format_map({**out["config"], **r}),
                "ours_errors": r["errors"],
                "ours_errors_on_3": r["errors_on_3"],
                "paper_errors": "" if paper is None else paper,
                "paper_errors_on_3": "" if paper3 is None else paper3,
            }
        )
    return rows


def markdown_table(out: dict) -> str:
    """The comparison table as markdown ('-': the paper gives no number)."""
    d = out["data"]
    lines = [
        f"| model | ours: errors / {d['test']} | ours: errors on the {d['test_3s']} test 3s "
        "| paper: errors / 10000 | paper: errors on the 1010 test 3s |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in table_rows(out):
        cells = [
            r["model"],
            r["ours_errors"],
            r["ours_errors_on_3"],
            r["paper_errors"],
            r["paper_errors_on_3"],
        ]
        lines.append("| " + " | ".join(str(c) if c != "" else "-" for c in cells) + " |")
    return "\n".join(lines)


def run_notes(out: dict) -> str:
    """Markdown lines on how the run differs from the paper's setup, from the recorded numbers."""
    c, d, env = out["config"], out["data"], out["environment"]
    lines = [
        f"Data: {d['source']}; {d['train']} training images ({d['heldout']} more held out for "
        f"choosing the bias shift), {d['test']} test images. Teacher {c['teacher_epochs']} epochs, "
        f"students {c['student_epochs']} epochs each, SGD momentum {c['momentum']:g}, batch "
        f"{c['batch_size']}, cosine learning-rate decay from {c['teacher_lr']:g} (teacher) and "
        f"{c['student_lr']:g} (students); seed {c['seed']}; {env['device']}, {env['threads']} "
        f"thread(s), torch {env['torch']}; whole run {out['total_seconds'] / 60:.1f} min.",
    ]
    if "reference_check" in out:
        rc = out["reference_check"]
        text = "kdfused.kd_loss vs kdfused.reference. "
        if "first_batch_loss_float64" in rc:  # (absent from results written by older versions)
            text += (
                f"On the same batch and weights the float32 losses are "
                f"{rc['first_batch_loss_kdfused']:.7g} vs {rc['first_batch_loss_reference']:.7g} "
                f"(float64: {rc['first_batch_loss_float64']:.7g}; at T = "
                f"{out['config']['temperature']:g} the loss is T^2 times a small KL, so float32 "
                f"rounding shows in its value) and the logit gradients differ by at most "
                f"{rc['first_batch_max_abs_grad_diff']:.1e} (largest entry "
                f"{rc['first_batch_max_abs_grad']:.1e}). "
            )
        text += "Trained from the same seed and data order, "
        if "max_abs_diff_step_loss_per_epoch" in rc:
            per_epoch = rc["max_abs_diff_step_loss_per_epoch"]
            text += (
                f"the step losses differ by at most {per_epoch[0]:.1e} in the first epoch "
                f"and {max(per_epoch):.1e} over the run, "
            )
        text += (
            f"the per-epoch mean losses by at most {rc['max_abs_diff_epoch_loss']:.1e} (relative "
            f"{rc['max_rel_diff_epoch_loss']:.1e}): float rounding differences that SGD amplifies,"
            f" as it would for any change of summation order. Final test errors "
            f"{rc['test_errors_kdfused'][-1]} vs {rc['test_errors_reference'][-1]}. Time in the "
            f"loss alone (forward + backward) during training: {rc['loss_seconds_kdfused']:.2f} s "
            f"with kdfused, {rc['loss_seconds_reference']:.2f} s with the reference (totals that "
            f"depend on the machine's load during each run)"
        )
        if "loss_ms_per_batch_interleaved_kdfused" in rc:
            text += (
                f"; per batch, measured alternately under the same load: "
                f"{rc['loss_ms_per_batch_interleaved_kdfused']:.3f} ms vs "
                f"{rc['loss_ms_per_batch_interleaved_reference']:.3f} ms"
            )
        text += "."
        lines.append(text)
    return "\n\n".join(lines)


def plot(out: dict, path: Path) -> bool:
    """Training curves: test errors per epoch, kdfused vs reference loss, bias-shift search."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: skipping the plot", file=sys.stderr)
        return False
    c = out["curves"]
    fig, ax = plt.subplots(1, 3, figsize=(16, 4.6))
    for key, style in (
        ("teacher", "k.-"),
        ("student_hard", "C3.-"),
        ("distilled_soft", "C0.-"),
        ("distilled_soft_hard", "C2.-"),
        ("mythical", "C1.-"),
    ):
        if key in c:
            ax[0].plot(c[key]["epoch"], c[key]["test_errors"], style, label=key)
    title = "test errors"
    if out["config"]["dataset"] == "mnist":
        for key in ("teacher", "distilled_soft", "student_hard", "mythical"):
            ax[0].axhline(PAPER[key][0], color="grey", lw=0.8, ls=":")
        title += " (dotted: the paper's 67, 74, 146, 206)"
    ax[0].set(
        yscale="log", xlabel="epoch", ylabel=f"test errors / {out['data']['test']}", title=title
    )
    ax[0].legend(fontsize=8)
    if "distilled_reference" in c:
        a, b = c["distilled_soft"], c["distilled_reference"]
        rc = out["reference_check"]
        ax[1].plot(
            a["epoch"],
            a["train_loss"],
            "C0o-",
            lw=3,
            alpha=0.5,
            label=f"kdfused.kd_loss ({rc['loss_seconds_kdfused']:.2f} s in loss)",
        )
        ax[1].plot(
            b["epoch"],
            b["train_loss"],
            "k.--",
            lw=1,
            label=f"kdfused.reference ({rc['loss_seconds_reference']:.2f} s in loss)",
        )
        ax[1].set(
            yscale="log",
            xlabel="epoch",
            ylabel="mean training loss (T=20, soft only)",
            title="same run, two loss implementations\n"
            f"max |diff| = {rc['max_abs_diff_epoch_loss']:.1e}",
        )
        handles, labels = ax[1].get_legend_handles_labels()
        if "max_abs_diff_step_loss_per_epoch" in rc:
            twin = ax[1].twinx()
            twin.plot(
                a["epoch"],
                rc["max_abs_diff_step_loss_per_epoch"],
                "C7s:",
                ms=3,
                label="largest |difference| of a step's loss in the epoch",
            )
            twin.set(yscale="log", ylabel="|kdfused - reference|")
            handles += twin.get_legend_handles_labels()[0]
            labels += twin.get_legend_handles_labels()[1]
        ax[1].legend(handles, labels, fontsize=8)
    bs = out["bias_shift"]
    ax[2].plot(
        *zip(*bs["heldout_curve"]), "C1-", label=f"held-out ({out['data']['heldout']} images)"
    )
    ax[2].plot(*zip(*bs["test_curve"]), "C0-", label=f"test ({out['data']['test']} images)")
    ax[2].axvline(
        bs["chosen"], color="C1", ls="--", lw=1, label=f"chosen on held-out: {bs['chosen']:.1f}"
    )
    ax[2].axvline(3.5, color="grey", ls=":", lw=1, label="paper: 3.5")
    ax[2].set(
        yscale="log",
        xlabel="added to the class-3 bias",
        ylabel="errors",
        title="mythical 3: bias shift",
    )
    ax[2].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_results(out: dict, out_dir: Path, stem: str) -> dict:
    """Write ``<stem>.md``, ``.csv``, ``.json`` and ``_curves.png`` into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {ext: out_dir / f"{stem}.{ext}" for ext in ("md", "csv", "json")}
    rows = table_rows(out)
    with open(paths["csv"], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    paths["json"].write_text(json.dumps(out, indent=1) + "\n")
    paths["md"].write_text(markdown_table(out) + "\n\n" + run_notes(out) + "\n")
    paths["png"] = out_dir / f"{stem}_curves.png"
    if not plot(out, paths["png"]):
        del paths["png"]
    return paths
