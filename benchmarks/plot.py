#!/usr/bin/env python
"""Plots of a benchmark run: fwd+bwd time and peak memory against V, one line per provider.

    python benchmarks/plot.py benchmarks/results/cpu-standard.json   # -> cpu-standard.png

Panels: one column per (style, dtype) family (classifier V <= 1000, language-model V > 1000);
colour = provider, marker = N. Dashed black lines are the floors: time to move the bytes a fused
fwd+bwd must move (read s, t; write the gradient) at the measured copy bandwidth, and the
gradient's own size for memory.
"""

from __future__ import annotations

import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter  # noqa: E402

COLORS = {
    "kdfused": "tab:red",
    "eager": "tab:blue",
    "compile": "tab:green",
    "liger_kl": "tab:purple",
    "liger_jsd": "tab:orange",
    "reference": "tab:gray",
}
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*"]
ELEMENT_SIZE = {"fp32": 4, "bf16": 2, "fp16": 2}


def _family(r: dict) -> tuple:
    return ("classifier" if r["V"] <= 1000 else "LM", r["dtype"])


def plot(records: list[dict], meta: dict, path: str) -> None:
    """Write the time/memory-vs-V figure of ``records`` to ``path`` (PNG)."""
    ok = [r for r in records if "fwdbwd" in r]
    families = sorted(
        {_family(r) for r in ok}, key=lambda f: (f[0] != "classifier", f[1] != "fp32", f[1])
    )
    if not families:
        raise ValueError("no successful measurements to plot")
    ns = sorted({r["N"] for r in ok})
    marker = {n: MARKERS[i % len(MARKERS)] for i, n in enumerate(ns)}
    providers = [p for p in meta.get("providers", COLORS) if any(r["provider"] == p for r in ok)]
    copy = meta.get("copy_gbps")

    fig, axes = plt.subplots(2, len(families), figsize=(4.6 * len(families), 7.2), squeeze=False)
    for col, fam in enumerate(families):
        ax_t, ax_m = axes[0][col], axes[1][col]
        rows = [r for r in ok if _family(r) == fam]
        for n in sorted({r["N"] for r in rows}):
            for p in providers:
                pts = sorted(
                    (r["V"], r["fwdbwd"]["median_ms"], r.get("fwdbwd_peak_mib"))
                    for r in rows
                    if r["N"] == n and r["provider"] == p
                )
                if not pts:
                    continue
                vs = [x[0] for x in pts]
                style = dict(color=COLORS.get(p, "black"), marker=marker[n], ms=5, lw=1.4)
                ax_t.plot(vs, [x[1] for x in pts], **style)
                mem = [(v, m) for v, _, m in pts if m is not None]
                if mem:
                    ax_m.plot([x[0] for x in mem], [max(x[1], 1e-2) for x in mem], **style)
            vs = sorted({r["V"] for r in rows if r["N"] == n})
            nbytes = [n * v * ELEMENT_SIZE[fam[1]] for v in vs]
            if copy:
                ax_t.plot(
                    vs,
                    [3 * b / (copy * 1e9) * 1e3 for b in nbytes],
                    "k--",
                    lw=0.8,
                    marker=marker[n],
                    ms=3,
                )
            ax_m.plot(vs, [b / 2**20 for b in nbytes], "k--", lw=0.8, marker=marker[n], ms=3)
        ax_t.set_title(f"{fam[0]}, {fam[1]}")
        for ax in (ax_t, ax_m):
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.grid(True, which="both", alpha=0.3)
            for axis in (ax.xaxis, ax.yaxis):
                axis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
                axis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))
                axis.set_minor_formatter(NullFormatter())
        ax_m.set_xlabel("vocabulary / classes V")
        if col == 0:
            ax_t.set_ylabel("fwd+bwd time (ms, median)")
            ax_m.set_ylabel("fwd+bwd peak memory above inputs (MiB)")

    handles = [Line2D([], [], color=COLORS.get(p, "black"), lw=2, label=p) for p in providers]
    handles += [Line2D([], [], color="gray", marker=marker[n], ls="", label=f"N={n}") for n in ns]
    handles += [Line2D([], [], color="k", ls="--", lw=0.8, label="floor")]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 8), frameon=False)
    dev = meta.get("device_name", meta.get("device", ""))
    fig.suptitle(
        f"kdfused benchmark: {dev}, {meta.get('threads', '?')} threads, "
        f"torch {meta.get('torch', '?')}  (loss 0.5*T^2*KL + 0.5*CE, T=2)",
        fontsize=10,
    )
    fig.tight_layout(rect=(0, 0.06, 1, 0.96))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__)
        return 2
    with open(argv[0]) as f:
        data = json.load(f)
    out = os.path.splitext(argv[0])[0] + ".png"
    plot(data["results"], data["meta"], out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
