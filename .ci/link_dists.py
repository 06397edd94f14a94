"""Installs distributions into a fresh environment by hard-linking them, and everything they
require, from the environment that runs this script.

    python .ci/link_dists.py TARGET_SITE_PACKAGES torch [pytest ...]

The wheel check's fresh virtual environment needs the torch that kdfused was built against;
downloading and unpacking it again (about 5 GB with its CUDA libraries) would cost minutes. Linking
the installed files of torch and of its requirements (markers and extras evaluated, recursively),
RECORD and all, gives the fresh environment exactly those distributions, as pip sees them, and
nothing else. Files are copied where a hard link is not possible. Console scripts are left out.
"""

from __future__ import annotations

import importlib.metadata as md
import os
import re
import shutil
import sys

try:
    from packaging.requirements import Requirement
except ImportError:  # pip's copy
    from pip._vendor.packaging.requirements import Requirement


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(names: list[str]) -> dict[str, md.Distribution]:
    """The distributions `names` and, recursively, those they require."""
    found: dict[str, md.Distribution] = {}
    extras_done: set[tuple[str, str]] = set()
    todo = [(Requirement(n), "") for n in names]
    while todo:
        req, _ = todo.pop()
        key = normalize(req.name)
        dist = found.get(key) or md.distribution(req.name)
        found[key] = dist
        for extra in {"", *req.extras}:
            if (key, extra) in extras_done:
                continue
            extras_done.add((key, extra))
            for line in dist.requires or []:
                sub = Requirement(line)
                if sub.marker is None or sub.marker.evaluate({"extra": extra}):
                    todo.append((sub, extra))
    return found


def link(dist: md.Distribution, target: str) -> int:
    n = 0
    for rel in dist.files or []:
        if str(rel).startswith(".."):  # console scripts in bin/
            continue
        src = str(dist.locate_file(rel))
        if not os.path.isfile(src):
            continue
        dst = os.path.join(target, str(rel))
        if os.path.lexists(dst):
            continue
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)
        n += 1
    return n


def main(argv: list[str]) -> int:
    if len(argv) < 3:
        print(__doc__, file=sys.stderr)
        return 2
    target, names = argv[1], argv[2:]
    dists = closure(names)
    files = sum(link(d, target) for d in dists.values())
    listed = ", ".join(f"{d.metadata['Name']} {d.version}" for d in dists.values())
    print(f"linked {len(dists)} distributions ({files} files) into {target}: {listed}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
