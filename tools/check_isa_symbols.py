"""Fails when two instruction-set objects of the CPU kernels define the same function.

The CPU kernels are compiled once per instruction set from the same headers
(csrc/cpu/kd_kernel_{scalar,default,avx2,avx512}.cpp, csrc/cpu/topk/kd_topk_*.cpp). Their own
code lives in an ISA-specific inline namespace, but an inline function from elsewhere (a c10
string helper behind TORCH_CHECK, a std::vector member) is emitted as a weak symbol under the SAME
name in each of those objects, and the linker keeps one copy for every caller: if that is the
AVX-512 one, the default path runs AVX-512 instructions on a CPU without them. Link order
(portable objects first) hides this today; this check makes sure there is nothing to hide.

    python tools/check_isa_symbols.py [BUILD_DIR]     (default: build/)

Reads every object file of those sources under BUILD_DIR (setup.py's build/temp.*/ and CMake's
CMakeFiles/*.dir/ layouts) with `nm`, and lists each function symbol (nm types T, W, i) defined in
objects of two different instruction sets, where one of them is AVX2 or AVX-512. Exit status 0
when there is none, 1 when there is, 2 when no objects were found.
"""

from __future__ import annotations

import collections
import glob
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ISA_OBJECT = re.compile(r"(kd_kernel|kd_topk)_(scalar|default|avx2|avx512)\.(cpp\.)?o$")
CODE_TYPES = {"T", "W", "i"}


def isa_objects(build_dir: str) -> dict[str, list[str]]:
    found = collections.defaultdict(list)
    for path in glob.glob(os.path.join(build_dir, "**", "*.o"), recursive=True):
        m = ISA_OBJECT.search(os.path.basename(path))
        if m:
            found[m.group(2)].append(path)
    return found


def code_symbols(path: str) -> set[str]:
    out = subprocess.run(
        ["nm", "--defined-only", path], capture_output=True, text=True, check=True
    ).stdout
    syms = set()
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[1] in CODE_TYPES:
            syms.add(parts[2])
    return syms


def demangle(names):
    try:
        r = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True)
        return r.stdout.splitlines() if r.returncode == 0 else list(names)
    except OSError:
        return list(names)


def main(argv) -> int:
    build_dir = argv[1] if len(argv) > 1 else os.path.join(ROOT, "build")
    objects = isa_objects(build_dir)
    if not objects:
        print(f"check_isa_symbols: no instruction-set objects under {build_dir}")
        return 2
    where = collections.defaultdict(set)  # symbol -> instruction sets defining it
    for isa, paths in objects.items():
        for path in paths:
            for sym in code_symbols(path):
                where[sym].add(isa)
    shared = sorted(s for s, isas in where.items() if len(isas) > 1 and isas & {"avx2", "avx512"})
    n_obj = sum(len(p) for p in objects.values())
    if not shared:
        print(f"check_isa_symbols: {n_obj} objects, no function shared between instruction sets")
        return 0
    print(f"check_isa_symbols: {len(shared)} function(s) defined by several instruction sets:")
    for sym, name in zip(shared, demangle(shared)):
        print(f"  {name}  [{', '.join(sorted(where[sym]))}]")
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
