"""Build kdfused: the C++ CPU kernel always, the CUDA kernel when a CUDA build of PyTorch and nvcc
are present (no GPU needed to compile). Build in place with ``python setup.py build_ext --inplace``
(what the Makefile does; ninja rebuilds only what changed) or install with
``pip install --no-build-isolation -e .``, so that the build sees the installed torch.

Environment:
  KDFUSED_CUDA=0/1        force the CUDA sources off/on (default: on when torch.version.cuda
                          and nvcc)
  TORCH_CUDA_ARCH_LIST    GPU architectures (default: the visible GPU's own; without a visible GPU
                          "8.0;9.0+PTX", i.e. A100 and H100/H200 code plus PTX that newer GPUs
                          JIT-compile)
  CUDA_HOME               the CUDA toolkit root (default: asked from nvcc itself)
  MAX_JOBS                parallel compile jobs (ninja)
  KDFUSED_CXX_STD=17|20   the C++ standard of every source, C++ and CUDA (default: the one the
                          installed torch's headers need: C++20 from torch 2.13 on, else C++17)

The build compiles against the torch of the environment it runs in, so it needs that torch: pip
must run it without build isolation (``pip install --no-build-isolation``). In pip's default
isolated build environment there is no torch (pyproject.toml does not ask for one, so that pip
never builds against a second torch downloaded for the build), and the build stops with a message
saying so. Only the sdist needs no torch.

The version is ``kdfused/_version.py``'s plus a local label naming what the build is for:
``+torch<torch's public version>.cu<torch's CUDA version>`` with the CUDA kernels (e.g.
``0.3.0+torch2.14.1.cu130``), ``+torch<version>.cpu`` without them. The extension's build record,
``kdfused/_build_meta.py``, is written next to it (kdfused/_extension.py reads it before loading
the extension).
"""

import glob
import os
import re
import shutil
import subprocess
import sys
import warnings

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
MIN_TORCH = "2.4"


def read_version():
    """kdfused/_version.py's __version__, read without importing the package."""
    with open(os.path.join(ROOT, "kdfused", "_version.py"), encoding="utf-8") as f:
        return re.search(r'^__version__ = "([^"]+)"$', f.read(), re.M).group(1)


VERSION = read_version()

NO_TORCH = f"""
kdfused: torch cannot be imported in the environment running this build. Build kdfused without
build isolation (pip install --no-build-isolation ...), in an environment that has torch.

kdfused is a PyTorch extension: its C++/CUDA code is compiled against the torch it will run with,
and only loads into that torch. So the build uses the torch already installed, never one downloaded
for the build (pip's default isolated build environment has none, and one downloaded there may
differ from yours, giving a binary that does not load). Install torch>={MIN_TORCH} first, then
build without build isolation:

    pip install --no-build-isolation .            (from a checkout; -e . for an editable install)
    pip install --no-build-isolation kdfused-{VERSION}.tar.gz
"""


def packaging_only(argv):
    """True for the commands that only package the sources (the sdist, and the egg_info run
    that asks for build requirements): these need neither torch nor a compiler."""
    args = set(argv[1:])
    builds = {"build", "build_ext", "build_py", "bdist", "bdist_wheel", "dist_info", "install"}
    builds |= {"develop", "editable_wheel"}
    if "sdist" in args:
        return not args & builds
    commands = {a for a in args if re.fullmatch(r"[a-z_]+", a)}  # not options, not paths
    return commands <= {"egg_info", "check"}


def base_metadata(version, install_requires):
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    return dict(
        name="kdfused",
        version=version,
        description="Fused knowledge-distillation loss for PyTorch (CPU and CUDA kernels)",
        long_description=readme,
        long_description_content_type="text/markdown",
        license_expression="MIT",
        license_files=["LICENSE"],
        packages=find_packages(include=["kdfused", "kdfused.*"]),
        package_data={"kdfused": ["py.typed"]},  # PEP 561: type checkers read the annotations
        python_requires=">=3.9",
        install_requires=install_requires,
        classifiers=[
            "Development Status :: 3 - Alpha",
            "Intended Audience :: Developers",
            "Intended Audience :: Science/Research",
            "Operating System :: POSIX :: Linux",
            "Programming Language :: C++",
            "Programming Language :: Python :: 3",
            "Typing :: Typed",
            "Environment :: GPU :: NVIDIA CUDA",
            "Topic :: Scientific/Engineering :: Artificial Intelligence",
        ],
        keywords=["pytorch", "knowledge distillation", "loss", "cuda", "custom op"],
    )


if packaging_only(sys.argv):
    # The sdist (or the build requirements): the sources and the plain version, no extension, no
    # torch; the rest of this file configures the extension. (Ending a setup script early is
    # what setuptools' PEP 517 backend warns about; nothing else here needs its warning.)
    setup(**base_metadata(VERSION, [f"torch>={MIN_TORCH}"]))
    warnings.filterwarnings("ignore", message="Running `setup.py` directly")
    sys.exit(0)


def find_cuda_home():
    """The toolkit root. nvcc may be a wrapper script outside the toolkit (then torch's guess,
    dirname(dirname(nvcc)), is wrong), so ask nvcc where it lives."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return "/usr/local/cuda" if os.path.exists("/usr/local/cuda/bin/nvcc") else None
    try:
        out = subprocess.run(
            [nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
            capture_output=True,
            text=True,
            timeout=120,
        )
        m = re.search(r"^#\$ TOP=(.*)$", out.stdout + out.stderr, re.M)
        if m:
            return os.path.realpath(m.group(1).strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))


def want_cuda(torch_cuda, cuda_home):
    flag = os.environ.get("KDFUSED_CUDA", "").strip()
    if flag in ("0", "1"):
        if flag == "1" and (torch_cuda is None or cuda_home is None):
            sys.exit(
                "KDFUSED_CUDA=1 but torch has no CUDA build or no CUDA toolkit (nvcc) was found"
            )
        return flag == "1"
    return torch_cuda is not None and cuda_home is not None


def pip_cuda_include_shim(cuda_home):
    """Headers such as cusparse.h, which torch's CUDA headers include, may exist only in the
    `nvidia` pip packages that torch depends on. Link just the missing ones into a build folder that
    goes on the include path (after nothing of the toolkit's is shadowed)."""
    toolkit_inc = os.path.join(cuda_home, "include")
    shim = os.path.join(ROOT, "build", "cuda_include_shim")
    shutil.rmtree(shim, ignore_errors=True)
    os.makedirs(shim)
    added = 0
    for sp in sys.path:
        for inc in sorted(glob.glob(os.path.join(sp, "nvidia", "*", "include"))):
            for name in os.listdir(inc):
                if not os.path.exists(os.path.join(toolkit_inc, name)) and not os.path.lexists(
                    os.path.join(shim, name)
                ):
                    os.symlink(os.path.join(inc, name), os.path.join(shim, name))
                    added += 1
    return shim if added else None


CUDA_HOME = find_cuda_home()
if CUDA_HOME and not os.environ.get("CUDA_HOME"):
    os.environ["CUDA_HOME"] = CUDA_HOME  # before torch.utils.cpp_extension reads it

try:
    import torch
except ImportError:
    sys.exit(NO_TORCH)
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

if torch.__version__ < MIN_TORCH:
    sys.exit(f"kdfused needs torch>={MIN_TORCH}; this environment has torch {torch.__version__}")

WITH_CUDA = want_cuda(torch.version.cuda, CUDA_HOME)
TORCH_VERSION = str(torch.__version__)
TORCH_PUBLIC = TORCH_VERSION.split("+")[0]


def local_label(with_cuda):
    """What the build is for: torch's public version, then cuXYZ (torch's CUDA version) with the
    CUDA kernels, cpu without them."""
    target = "cu" + torch.version.cuda.replace(".", "") if with_cuda else "cpu"
    return re.sub(r"[^A-Za-z0-9]+", ".", f"torch{TORCH_PUBLIC}.{target}")


def cuda_arch_list():
    """TORCH_CUDA_ARCH_LIST if set; else the visible GPU's architecture (as torch itself does);
    else (a build machine without a GPU) 8.0 and 9.0 with PTX for newer GPUs."""
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return os.environ["TORCH_CUDA_ARCH_LIST"]
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        return f"{major}.{minor}"
    return "8.0;9.0+PTX"


if WITH_CUDA:
    os.environ["TORCH_CUDA_ARCH_LIST"] = cuda_arch_list()


def torch_cxx_std():
    """The C++ standard torch's headers require: ATen.h stops a compile older than its minimum
    (`#error C++20 or later ...` from torch 2.13 on, C++17 before), so ask the header itself; if it
    cannot be read, go by the version."""
    aten = os.path.join(os.path.dirname(torch.__file__), "include", "ATen", "ATen.h")
    try:
        with open(aten, encoding="utf-8", errors="replace") as f:
            m = re.search(r"__cplusplus\s*<\s*(\d{6})L", f.read())
        if m:
            return "20" if int(m.group(1)) >= 202002 else "17"
    except OSError:
        pass
    major, minor = (int(x) for x in re.findall(r"\d+", torch.__version__)[:2])
    return "20" if (major, minor) >= (2, 13) else "17"


def cxx_std():
    """KDFUSED_CXX_STD (17 or 20) if set, else what torch needs. Stated explicitly for the C++ and
    the CUDA compiler (torch.utils.cpp_extension would otherwise pick its own default, C++20 from
    torch 2.13 on and C++17 before; the sources compile as either)."""
    env = os.environ.get("KDFUSED_CXX_STD", "").strip()
    if env:
        if env not in ("17", "20"):
            sys.exit(f"KDFUSED_CXX_STD must be 17 or 20, got {env!r}")
        return env
    return torch_cxx_std()


CXX_STD = cxx_std()


def cpu_sources():
    """Every C++ source under csrc/ (the op schemas and host code at the top, the CPU backend in
    csrc/cpu/), except the C++ test programs of csrc/tests_cpp, in link order.

    Link order matters: the portable objects come first so that, for inline functions that several
    objects define, the linker keeps their copy and not one compiled for AVX2/AVX-512. So the
    instruction-set objects (the files named *_avx2.cpp / *_avx512.cpp) go last. (They define no
    such function today: tools/check_isa_symbols.py, run by CI.)"""
    found = sorted(glob.glob("csrc/**/*.cpp", recursive=True))
    found = [f for f in found if not f.startswith("csrc/tests_cpp/")]
    isa = [f for f in found if re.search(r"_avx(2|512)\.cpp$", f)]
    return [f for f in found if f not in isa] + isa


sources = cpu_sources()


def openmp_flags():
    """Compile and link flags that make at::parallel_for parallel in this extension.

    at::parallel_for is a header template: with torch's OpenMP backend its `#pragma omp parallel`
    is compiled into the extension, and without -fopenmp it silently runs on ONE thread. The
    OpenMP runtime linked is libgomp.so.1, the soname of the copy torch loads first, so the
    extension shares torch's thread pool (torch.set_num_threads applies to it).
    """
    if sys.platform.startswith("linux") and torch.backends.openmp.is_available():
        return ["-fopenmp"], ["-fopenmp"]
    return [], []


omp_compile, omp_link = openmp_flags()
cxx_flags = [f"-std=c++{CXX_STD}", "-O3", "-fvisibility=hidden", *omp_compile]
if sys.platform.startswith("linux"):
    # A quiet build: torch's at::vec headers, included by every CPU object, carry pragmas GCC does
    # not know (#pragma unroll, clang diagnostics: about 150 warnings a build), and GCC notes that a
    # vector returned by value has another ABI without AVX; the per-instruction-set objects only
    # pass vectors among themselves (their entry points take the plain params struct).
    cxx_flags += ["-Wno-unknown-pragmas", "-Wno-psabi"]
nvcc_flags = [f"-std=c++{CXX_STD}", "-O3", "--expt-relaxed-constexpr", "-lineinfo"]
include_dirs = [os.path.join(ROOT, "csrc")]
define_macros = []

if WITH_CUDA:
    # csrc/cuda/*.cu and the generated instantiations/*.cu (csrc/cuda/instantiations/generate.py),
    # after the CPU sources (see the link order above).
    sources += sorted(glob.glob("csrc/cuda/**/*.cu", recursive=True))
    define_macros.append(("KDFUSED_WITH_CUDA", "1"))
    shim = pip_cuda_include_shim(CUDA_HOME)
    if shim:
        include_dirs.append(shim)
    ext = CUDAExtension(
        "kdfused._C",
        sources,
        include_dirs=include_dirs,
        define_macros=define_macros,
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
        extra_link_args=omp_link,
    )
else:
    ext = CppExtension(
        "kdfused._C",
        sources,
        include_dirs=include_dirs,
        define_macros=define_macros,
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=omp_link,
    )

FULL_VERSION = f"{VERSION}+{local_label(WITH_CUDA)}"
BUILD_RECORD = {
    "version": FULL_VERSION,
    "torch_version": TORCH_VERSION,
    "torch_cuda": torch.version.cuda,
    "torch_cxx11_abi": bool(torch._C._GLIBCXX_USE_CXX11_ABI),
    "cuda": WITH_CUDA,
    "cuda_arch_list": os.environ["TORCH_CUDA_ARCH_LIST"] if WITH_CUDA else None,
    "cxx_std": CXX_STD,
}


class BuildExtensionWithRecord(BuildExtension):
    """torch's BuildExtension (ninja, which prints a [n/m] line per object and recompiles only
    what changed), always run: setuptools would otherwise skip an extension whose sources are
    older than its last build even when torch or the options changed. Writes the build record
    (kdfused/_build_meta.py) next to each extension it builds."""

    def finalize_options(self):
        super().finalize_options()
        self.force = True

    def run(self):
        super().run()
        for e in self.extensions:
            path = os.path.join(os.path.dirname(self.get_ext_fullpath(e.name)), "_build_meta.py")
            with open(path, "w", encoding="utf-8") as f:
                f.write(
                    "# The build record of the compiled extension next to this file, written by "
                    "setup.py.\n# kdfused/_extension.py reads it before loading the extension.\n"
                    f"BUILD = {BUILD_RECORD!r}\n"
                )
            print(f"kdfused: build record {path}")

    def get_outputs(self):
        outputs = super().get_outputs()
        records = [os.path.join(os.path.dirname(o), "_build_meta.py") for o in outputs]
        return outputs + [r for r in records if r not in outputs]


print(
    f"kdfused: building as C++{CXX_STD} with OpenMP={'on' if omp_compile else 'off'}, "
    f"CUDA={'on' if WITH_CUDA else 'off'}"
    + (f" (CUDA_HOME={CUDA_HOME}, arch {os.environ['TORCH_CUDA_ARCH_LIST']})" if WITH_CUDA else "")
)
print(f"kdfused: version {FULL_VERSION}, against torch {TORCH_VERSION}")

setup(
    **base_metadata(FULL_VERSION, [f"torch=={TORCH_PUBLIC}"]),
    ext_modules=[ext],
    cmdclass={"build_ext": BuildExtensionWithRecord},
)
