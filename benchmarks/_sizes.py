"""The benchmark's size sets: (label, N, V, dtype) cases, the --sizes parser, the memory guard.

"core" is the headline case (CPU forward + backward, T = 2, soft 0.5 + hard 0.5); "classifier"
cases have V <= 1000, "lm" cases language-model vocabularies.
"""

from __future__ import annotations

ELEMENT_SIZE = {"fp32": 4, "bf16": 2, "fp16": 2}
LM_VOCABS = (32000, 128256, 151936, 256000)
# the headline performance case: CPU fwd+bwd, T=2, 0.5/0.5
CORE = ("core", 2048, 32000, "fp32")

# (label, N, V, dtype). "core" is the headline case; "classifier" V <= 1000; "lm" large V.
SETS = {
    "quick": [("classifier", 4096, 1000, "fp32"), CORE, ("lm", 1024, 32000, "bf16")],
    "quick-cuda": [
        ("classifier", 4096, 1000, "fp32"),
        CORE,
        ("lm", 8192, 128256, "bf16"),
        ("lm", 16384, 151936, "bf16"),
    ],
    "standard": (
        [("classifier", 256, 1000, "fp32")]
        + [("classifier", 4096, v, "fp32") for v in (10, 100, 1000)]
        + [CORE]
        + [("lm", 512, v, d) for d in ("fp32", "bf16") for v in LM_VOCABS]
    ),
    "standard-cuda": (
        [("classifier", 4096, v, "fp32") for v in (10, 100, 1000)]
        + [CORE]
        + [("lm", 8192, v, d) for d in ("fp32", "bf16") for v in LM_VOCABS]
    ),
    "full": (
        [("classifier", n, v, "fp32") for n in (256, 1024, 4096) for v in (10, 100, 1000)]
        + [CORE]
        + [
            ("lm", n, v, d)
            for d in ("fp32", "bf16")
            for n in (1024, 4096, 8192, 32768)
            for v in LM_VOCABS
        ]
    ),
}


def parse_sizes(text: str) -> list[tuple]:
    """``"2048x32000,1024x128256:bf16"`` -> cases (dtype defaults to fp32)."""
    cases = []
    for item in filter(None, (x.strip() for x in text.split(","))):
        shape, _, dtype = item.partition(":")
        n, v = (int(x) for x in shape.lower().split("x"))
        dtype = dtype or "fp32"
        if dtype not in ELEMENT_SIZE:
            raise SystemExit(f"unknown dtype {dtype!r} in --sizes; use fp32, bf16 or fp16")
        label = "core" if (n, v, dtype) == CORE[1:] else ("classifier" if v <= 1000 else "lm")
        cases.append((label, n, v, dtype))
    return cases


def memory_guard(case: tuple, device: str) -> str | None:
    """A reason to skip a CPU case whose inputs + gradient cannot fit in memory at all."""
    if device != "cpu":
        return None
    _, n, v, dtype = case
    need = 3 * n * v * ELEMENT_SIZE[dtype]
    try:
        with open("/proc/meminfo") as f:
            avail = next(int(x.split()[1]) * 1024 for x in f if x.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return None
    if need > 0.9 * avail:
        return (
            f"skipped: inputs + gradient need {need / 2**30:.1f} GiB, "
            f"{avail / 2**30:.1f} GiB available"
        )
    return None
