"""Compiles every kdfused source as C++17: the CPU sources with `g++ -fsyntax-only
-pedantic-errors` (so that C++20 extensions GCC would accept, e.g. designated initialisers, fail),
the CUDA ones with nvcc for sm_90 (device code at -O0: the front ends check the language, the
optimiser is the cost). kdfused builds as C++20 with torch >= 2.13 (whose headers need it) and as
C++17 with older torch, e.g. 2.11: this keeps the sources valid C++17. nvcc's front end accepts
some C++20 syntax in C++17 mode as an extension (designated initialisers, silently); C++20 library
features and keywords (std::span, <bit>, concepts, consteval, ...) fail there too.

torch 2.13+'s headers refuse C++17, so the check compiles against the headers of torch 2.11.0
(TORCH_SPEC): when the installed torch's headers allow C++17 it uses those, else it downloads
torch's smallest wheel (macOS arm64, ~80 MB, no dependencies) once into build/cxx17/ and keeps only
its include/. Those headers are platform-independent but for two, supplied here: the generated
CUDA macro header (CUDA wheels only) and sleef.h (taken from the installed torch: the arm64 one
lacks the x86 vector functions).

    python tools/cxx17_check.py [-j JOBS] [--no-cuda] [FILE ...]

Exit status 0 when every file compiled. Run by `make cxx17-check`.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import glob
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORK = os.path.join(ROOT, "build", "cxx17")
TORCH_SPEC = "torch==2.11.0"
# a pure-header stand-in for the generated header that only CUDA wheels ship
CUDA_CMAKE_MACROS = "#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n"


def allows_cxx17(include_dir: str) -> bool:
    try:
        with open(os.path.join(include_dir, "ATen", "ATen.h"), encoding="utf-8") as f:
            m = re.search(r"__cplusplus\s*<\s*(\d{6})L", f.read())
    except OSError:
        return False
    return m is not None and int(m.group(1)) <= 201703


def torch_include() -> str:
    """An include/ of a torch whose headers compile as C++17."""
    try:
        import torch.utils.cpp_extension as ext

        inc = ext.include_paths()[0]
        if allows_cxx17(inc):
            return inc
    except ImportError:
        pass
    version = TORCH_SPEC.split("==")[1]
    dest = os.path.join(WORK, f"torch-{version}")
    inc = os.path.join(dest, "torch", "include")
    if not allows_cxx17(inc):
        dl = os.path.join(WORK, "download")
        os.makedirs(dl, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps"]
        cmd += ["--only-binary=:all:", "--platform", "macosx_11_0_arm64"]
        cmd += ["--python-version", "3.11", TORCH_SPEC, "-d", dl]
        subprocess.run(cmd, check=True)
        wheel = glob.glob(os.path.join(dl, f"torch-{version}-*.whl"))[0]
        shutil.rmtree(dest, ignore_errors=True)
        with zipfile.ZipFile(wheel) as z:
            z.extractall(dest, [n for n in z.namelist() if n.startswith("torch/include/")])
        os.remove(wheel)
    macros = os.path.join(inc, "c10", "cuda", "impl", "cuda_cmake_macros.h")
    if not os.path.exists(macros):
        with open(macros, "w") as f:
            f.write(CUDA_CMAKE_MACROS)
    return inc


def find_cuda_home(nvcc: str) -> str:
    """The toolkit root (nvcc may be a wrapper outside it: ask nvcc, as setup.py does)."""
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    r = subprocess.run(
        [nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
        capture_output=True,
        text=True,
    )
    m = re.search(r"^#\$ TOP=(.*)$", r.stdout + r.stderr, re.M)
    if m:
        return os.path.realpath(m.group(1).strip())
    return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))


def x86_overlay(inc: str) -> str:
    """The downloaded headers come from an arm64 wheel, whose sleef.h lacks the x86 vector
    functions that ATen's AVX2/AVX-512 headers call: take the installed torch's sleef.h (not
    tied to a C++ standard) in an include folder searched first."""
    overlay = os.path.join(WORK, "x86_overlay")
    os.makedirs(overlay, exist_ok=True)
    try:
        import torch.utils.cpp_extension as ext

        here = os.path.join(ext.include_paths()[0], "sleef.h")
    except ImportError:
        here = ""
    dst = os.path.join(overlay, "sleef.h")
    if os.path.exists(here) and os.path.realpath(here) != os.path.realpath(
        os.path.join(inc, "sleef.h")
    ):
        shutil.copyfile(here, dst)
    elif os.path.exists(dst):
        os.remove(dst)
    return overlay


def nvidia_shim(cuda_home: str) -> str | None:
    """Headers that torch's CUDA headers include but only the `nvidia` pip packages have (as
    setup.py's pip_cuda_include_shim)."""
    shim = os.path.join(WORK, "cuda_include_shim")
    shutil.rmtree(shim, ignore_errors=True)
    os.makedirs(shim)
    toolkit = os.path.join(cuda_home, "include")
    for sp in sys.path:
        for inc in sorted(glob.glob(os.path.join(sp, "nvidia", "*", "include"))):
            for name in os.listdir(inc):
                if not os.path.exists(os.path.join(toolkit, name)) and not os.path.lexists(
                    os.path.join(shim, name)
                ):
                    os.symlink(os.path.join(inc, name), os.path.join(shim, name))
    return shim if os.listdir(shim) else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-j", "--jobs", type=int, default=int(os.environ.get("MAX_JOBS", "2")))
    ap.add_argument("--no-cuda", action="store_true", help="the CPU sources only")
    ap.add_argument("files", nargs="*")
    args = ap.parse_args()
    os.chdir(ROOT)

    inc = torch_include()
    py_inc = sysconfig.get_paths()["include"]
    overlay = x86_overlay(inc)
    includes = ["-Icsrc"]
    for d in (overlay, inc, f"{inc}/torch/csrc/api/include", py_inc):
        includes += ["-isystem", d]  # their warnings are not ours
    defines = ["-DTORCH_API_INCLUDE_EXTENSION_H", "-DTORCH_EXTENSION_NAME=_C"]
    files = args.files or sorted(
        glob.glob("csrc/**/*.cpp", recursive=True) + glob.glob("csrc/**/*.cu", recursive=True)
    )
    nvcc = shutil.which("nvcc")
    cuda_home = find_cuda_home(nvcc) if nvcc else None
    want_cuda = not args.no_cuda and any(f.endswith(".cu") for f in files)
    if want_cuda and not nvcc:
        print("cxx17-check: no nvcc: the CUDA sources are not checked", file=sys.stderr)
    shim = nvidia_shim(cuda_home) if want_cuda and nvcc else None
    out = tempfile.mkdtemp(prefix="cxx17-")

    def command(i: int, f: str) -> list[str] | None:
        if f.endswith(".cpp"):
            cuda = ["-DKDFUSED_WITH_CUDA=1"] if want_cuda and nvcc else []
            cxx = ["g++", "-std=c++17", "-fsyntax-only", "-fopenmp", "-Wall", "-pedantic-errors"]
            return [*cxx, *includes, *defines, *cuda, f]
        if not want_cuda or not nvcc:
            return None
        cmd = [nvcc, "-std=c++17", "-c", f, "-o", os.path.join(out, f"{i}.o"), *includes]
        cmd += [f"-I{shim}"] if shim else []
        cmd += [*defines, "-DKDFUSED_WITH_CUDA=1", "-gencode=arch=compute_90,code=sm_90"]
        # device code unoptimised: the front ends check the language, the optimiser is the cost
        cmd += ["-O0", "-Xcicc", "-O0", "-Xptxas", "-O0", "--expt-relaxed-constexpr"]
        cmd += ["-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__"]
        cmd += ["-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__"]
        return cmd + ["--compiler-options", "-fPIC"]

    def run(i: int, f: str):
        cmd = command(i, f)
        if cmd is None:
            return f, None, "", 0.0
        t0 = time.monotonic()
        r = subprocess.run(cmd, capture_output=True, text=True)
        return f, r.returncode, r.stdout + r.stderr, time.monotonic() - t0

    failed = checked = 0
    t0 = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(max(1, args.jobs)) as pool:
        for f, rc, log, dt in pool.map(lambda a: run(*a), enumerate(files)):
            if rc is None:
                continue
            checked += 1
            print(f"{'ok  ' if rc == 0 else 'FAIL'} {f} ({dt:.0f} s)", flush=True)
            if rc != 0:
                failed += 1
                print(log, flush=True)
    shutil.rmtree(out, ignore_errors=True)
    print(f"cxx17-check: torch headers {inc}, {time.monotonic() - t0:.0f} s")
    print(f"cxx17-check: {checked - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
