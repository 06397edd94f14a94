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
    "mythical": "mythical 3: soft only, no 3s in the transfer set",
    "mythical_bias_3.5": "mythical 3, class-3 bias +3.5 (the paper's shift)",
    "mythical_bias_heldout": "mythical 3, class-3 bias +{bias_shift:.1f} (chosen on held-out data)",
}


def seeds_text(r: dict, field: str) -> str:
    """``errors`` of a result: the number, or for several seeds ``mean ± sd (seed values)``."""
    if f"{field}_per_seed" not in r:
        return str(r[field])
    if len(r[f"{field}_per_seed"]) == 1:  # one seed: its count, no spread
        return str(r[f"{field}_per_seed"][0])
    per_seed = ", ".join(str(v) for v in r[f"{field}_per_seed"])
    return f"{r[field]:.1f} ± {r[field + '_sd']:.1f} ({per_seed})"


def table_rows(out: dict) -> list[dict]:
    """One row per result: model, ours and the paper's errors (total and on the test 3s); for a
    student trained with several seeds, the mean, the standard deviation and each seed's count."""
    rows = []
    for key, r in out["results"].items():
        paper, paper3 = PAPER[key]
        seeds = r.get("seeds", [r["seed"]] if "seed" in r else [])
        rows.append(
            {
                "key": key,
                "model": DESCRIPTION[key].format_map({**out["config"], **r}),
                "seeds": " ".join(str(s) for s in seeds),
                "ours_errors": r["errors"],
                "ours_errors_sd": r.get("errors_sd", ""),
                "ours_errors_on_3": r["errors_on_3"],
                "ours_errors_on_3_sd": r.get("errors_on_3_sd", ""),
                "ours_errors_per_seed": " ".join(str(v) for v in r.get("errors_per_seed", [])),
                "paper_errors": "" if paper is None else paper,
                "paper_errors_on_3": "" if paper3 is None else paper3,
            }
        )
    return rows


def markdown_table(out: dict) -> str:
    """The comparison table as markdown ('-': the paper gives no number; several seeds:
    mean ± standard deviation, then each seed's count)."""
    d = out["data"]
    lines = [
        f"| model | ours: errors / {d['test']} | ours: errors on the {d['test_3s']} test 3s "
        "| paper: errors / 10000 | paper: errors on the 1010 test 3s |",
        "|---|---:|---:|---:|---:|",
    ]
    for key, r in zip(out["results"], table_rows(out)):
        res = out["results"][key]
        cells = [
            r["model"],
            seeds_text(res, "errors"),
            seeds_text(res, "errors_on_3"),
            r["paper_errors"],
            r["paper_errors_on_3"],
        ]
        lines.append("| " + " | ".join(str(c) if c != "" else "-" for c in cells) + " |")
    return "\n".join(lines)


def distillation_gain(out: dict) -> dict:
    """The soft-only student's gain over the hard-label student (mean over seeds), beside the seed
    spread of both."""
    hard, soft = out["results"]["student_hard"], out["results"]["distilled_soft"]
    gain = hard["errors"] - soft["errors"]
    return {
        "fewer_errors": round(gain, 2),
        "fewer_errors_percent": round(100 * gain / hard["errors"], 1) if hard["errors"] else 0.0,
        "largest_sd": max(hard.get("errors_sd", 0.0), soft.get("errors_sd", 0.0)),
        "ranges_overlap": min(hard.get("errors_per_seed", [hard["errors"]]))
        <= max(soft.get("errors_per_seed", [soft["errors"]])),
    }


def run_notes(out: dict) -> str:
    """Markdown lines on the run and how it differs from the paper's setup, from the recorded
    numbers."""
    c, d, env, res = out["config"], out["data"], out["environment"], out["results"]
    g = distillation_gain(out)
    t = res["teacher"]
    seeds = ", ".join(str(s) for s in c["student_seeds"])
    gain = (
        f"Distillation gain: the soft-only student makes {g['fewer_errors']:.1f} fewer test errors "
        f"than the hard-label student ({g['fewer_errors_percent']:.0f}% fewer; "
    )
    if len(c["student_seeds"]) > 1:
        gain += (
            f"mean over seeds {seeds}); the larger of the two standard deviations over seeds is "
            f"{g['largest_sd']:.1f}, and the per-seed ranges "
            + ("overlap." if g["ranges_overlap"] else "do not overlap.")
        )
    else:
        gain += f"one seed, {seeds}: no spread to compare with)."
    lines = [
        gain,
        f"Data: {d['source']}; {d['train']} training images, {d['heldout']} more held out "
        f"as the validation set (it alone chooses the stopping epochs and the bias shift; the "
        f"test set chooses nothing), {d['test']} test images. Teacher: "
        f"{c['teacher_epochs']}-epoch schedule, cosine learning-rate decay from "
        f"{c['teacher_lr']:g}, dropout {c['input_dropout']:g} (inputs) / "
        f"{c['hidden_dropout']:g} (hidden), max-norm {c['max_norm']:g}, ±{c['jitter']} px "
        f"jitter{_teacher_selection(out)}; {t.get('transfer_set_errors', '?')} errors on its own "
        f"(un-jittered) transfer set. Students: a {c['student_epochs']}-epoch schedule, cosine "
        f"decay from {c['student_lr']:g}, no regularisation, seeds {seeds} (initial weights and "
        f"data order){_student_selection(out)}; the teacher's logits on the transfer set computed "
        f"once. SGD momentum {c['momentum']:g}, batch {c['batch_size']}; teacher seed {c['seed']}.",
    ]
    run = out.get("run", {})
    text = (
        f"Run: {env['device']}, {env['threads']} thread(s) on {env.get('cpus', '?')} CPU(s), "
        f"torch {env['torch']}; whole run {out['total_seconds'] / 60:.1f} min"
    )
    if run.get("load_1min_mean") is not None:
        text += (
            f" (1-minute load average {run['load_1min_mean']:.1f} on average over the epochs, "
            f"{run['load_1min_max']:.1f} at most)"
        )
    if "teacher" in out.get("curves", {}) and "train_seconds" in out["curves"]["teacher"]:
        text += f"; the teacher alone {out['curves']['teacher']['train_seconds'] / 60:.1f} min"
    if out.get("teacher_from_cache"):
        text += " (teacher loaded from a cache, trained by an earlier run)"
    if run.get("started"):
        text += f"; started {run['started']}"
    text += "."
    if run.get("command"):
        text += f" Command: `{run['command']}`."
    lines.append(text)
    if "reference_check" in out:
        rc = out["reference_check"]
        n = rc.get("epochs", len(rc["test_errors_kdfused"]))
        text = "kdfused.kd_loss vs kdfused.reference. "
        text += (
            f"On the same batch and weights the float32 losses are "
            f"{rc['first_batch_loss_kdfused']:.7g} vs {rc['first_batch_loss_reference']:.7g} "
            f"(float64: {rc['first_batch_loss_float64']:.7g}; at T = "
            f"{out['config']['temperature']:g} the loss is T^2 times a small KL, so float32 "
            f"rounding shows in its value) and the logit gradients differ by at most "
            f"{rc['first_batch_max_abs_grad_diff']:.1e} (largest entry "
            f"{rc['first_batch_max_abs_grad']:.1e}). "
        )
        per_epoch = rc["max_abs_diff_step_loss_per_epoch"]
        text += (
            f"The first {n} epoch(s) of the soft-only student trained with each, from the same "
            f"seed and data order: the step losses differ by at most {per_epoch[0]:.1e} in the "
            f"first epoch and {max(per_epoch):.1e} over the run, the per-epoch mean losses by at "
            f"most {rc['max_abs_diff_epoch_loss']:.1e} (relative "
            f"{rc['max_rel_diff_epoch_loss']:.1e}): float rounding differences that SGD amplifies,"
            f" as it would for any change of summation order. Test errors after {n} epoch(s): "
            f"{rc['test_errors_kdfused'][-1]} vs {rc['test_errors_reference'][-1]}. Time in the "
            f"loss alone (forward + backward) during those epochs: "
            f"{rc['loss_seconds_kdfused']:.2f} s with kdfused, {rc['loss_seconds_reference']:.2f}"
            f" s with the reference (totals that depend on the machine's load during each run); "
            f"per batch, measured alternately under the same load: "
            f"{rc['loss_ms_per_batch_interleaved_kdfused']:.3f} ms vs "
            f"{rc['loss_ms_per_batch_interleaved_reference']:.3f} ms."
        )
        lines.append(text)
    return "\n\n".join(lines)


def _teacher_selection(out: dict) -> str:
    """How the teacher's weights were chosen (empty for runs that did not record it)."""
    h = out.get("curves", {}).get("teacher", {})
    e = h.get("selected_epoch")
    if e is None:
        return ""
    return (
        f", kept at the epoch with the fewest validation errors: epoch {e}, "
        f"{h['heldout_errors'][e - 1]} validation errors"
    )


def _student_selection(out: dict) -> str:
    """How the students' stopping epoch was chosen (empty for runs that did not record it)."""
    sch = out.get("schedule")
    if not sch:
        return ""
    e, summed = sch["student_epoch"], sch["student_heldout_errors_summed"]
    n = len(out["config"]["student_seeds"]) * 3
    return (
        f"; every student is read at one epoch of that schedule, the one with the fewest "
        f"validation errors summed over the {n} student runs (3 variants x seeds): epoch {e}, "
        f"{summed[e - 1] / n:.1f} validation errors per run on average, against "
        f"{summed[-1] / n:.1f} at the last epoch; the mythical-3 student is trained for those "
        f"{e} epochs"
    )


def _seed_curves(curves: dict, key: str, field: str):
    """Epochs and the per-seed curves (rows) of ``field`` for a student variant (``key/seedN``
    entries) or a single run (``key``)."""
    runs = [h for k, h in curves.items() if k == key or k.startswith(key + "/seed")]
    if not runs:
        return None, None
    import numpy as np

    n = min(len(h[field]) for h in runs)
    return runs[0]["epoch"][:n], np.array([h[field][:n] for h in runs], dtype=float)


def plot(out: dict, path: Path) -> bool:
    """Training curves: test and held-out errors per epoch (students: mean over seeds, band =
    range), kdfused vs reference loss, bias-shift search."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: skipping the plot", file=sys.stderr)
        return False
    c = out["curves"]
    fig, axes = plt.subplots(2, 2, figsize=(14, 9.5))
    ax = axes.ravel()
    styles = (
        ("teacher", "k"),
        ("student_hard", "C3"),
        ("distilled_soft", "C0"),
        ("distilled_soft_hard", "C2"),
        ("mythical", "C1"),
    )
    for i, (field, what) in enumerate(
        (
            ("test_errors", f"test errors / {out['data']['test']}"),
            ("heldout_errors", f"validation (held-out) errors / {out['data']['heldout']}"),
        )
    ):
        for key, color in styles:
            epochs, runs = _seed_curves(c, key, field)
            if epochs is None:
                continue
            label = key if len(runs) == 1 else f"{key} (mean of {len(runs)} seeds, range)"
            ax[i].plot(epochs, runs.mean(0), ".-", color=color, label=label)
            if len(runs) > 1:
                ax[i].fill_between(epochs, runs.min(0), runs.max(0), color=color, alpha=0.2)
        title = what
        if i == 0 and out["config"]["dataset"] == "mnist":
            for key in ("teacher", "distilled_soft", "student_hard", "mythical"):
                ax[0].axhline(PAPER[key][0], color="grey", lw=0.8, ls=":")
            title += "\n(dotted: the paper's 67, 74, 146, 206)"
        sch = out.get("schedule") or {}
        for epoch, color, who in (
            (sch.get("teacher_epoch"), "k", "teacher"),
            (sch.get("student_epoch"), "C0", "students"),
        ):
            if epoch is not None:
                ax[i].axvline(epoch, color=color, ls="--", lw=0.8, label=f"{who}: epoch {epoch}")
        if i == 1 and sch:
            title += "\n(dashed: the epochs chosen on it)"
        ax[i].set(yscale="log", xlabel="epoch", ylabel=what, title=title)
        ax[i].legend(fontsize=8)
    if "reference_check" in out:
        rc = out["reference_check"]
        a, b = rc["step_loss_first_epoch_kdfused"], rc["step_loss_first_epoch_reference"]
        ax[2].plot(
            a,
            "C0-",
            lw=3,
            alpha=0.5,
            label=f"kdfused.kd_loss ({rc['loss_seconds_kdfused']:.2f} s in the loss)",
        )
        ax[2].plot(
            b,
            "k--",
            lw=1,
            label=f"kdfused.reference ({rc['loss_seconds_reference']:.2f} s in the loss)",
        )
        ax[2].set(
            yscale="log",
            xlabel="step of the first epoch",
            ylabel="training loss (T=20, soft only)",
            title="same run, two loss implementations\n"
            f"largest |difference| of a step's loss: "
            f"{max(rc['max_abs_diff_step_loss_per_epoch']):.1e}",
        )
        ax[2].legend(fontsize=8)
    bs = out["bias_shift"]
    ax[3].plot(
        *zip(*bs["heldout_curve"]), "C1-", label=f"held-out ({out['data']['heldout']} images)"
    )
    ax[3].plot(*zip(*bs["test_curve"]), "C0-", label=f"test ({out['data']['test']} images)")
    ax[3].axvline(
        bs["chosen"], color="C1", ls="--", lw=1, label=f"chosen on held-out: {bs['chosen']:.1f}"
    )
    ax[3].axvline(3.5, color="grey", ls=":", lw=1, label="paper: 3.5")
    ax[3].set(
        yscale="log",
        xlabel="added to the class-3 bias",
        ylabel="errors",
        title="mythical 3: bias shift",
    )
    ax[3].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
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
