# Set-up installs PyTorch 2.13.0 first (an unpinned torch would pull the newest, multi-GB CUDA build), then the
# package in editable mode with its test extras. TORCH_INDEX: an index to take torch from, e.g.
# https://download.pytorch.org/whl/cpu for the CPU build where PyPI's Linux wheel would bring CUDA.
PYTHON ?= python3
TORCH_INDEX ?=

.PHONY: install demo test test-all gpu-check

install:
	$(PYTHON) -m pip install -q torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PYTHON) -m pip install -q -e ".[dev]"

demo: install
	$(PYTHON) demo/match_pair.py

test: install
	$(PYTHON) -m pytest -q -m "not slow"

test-all: install
	$(PYTHON) -m pytest -q

# On a CUDA machine whose Python already holds the dependencies (nothing is installed: such machines often
# have no network): the GPU tests, then (even if a test failed) the benchmark with its GPU sections, written
# to $OUT (or runs/benchmark_cuda); fails if either did.
gpu-check:
	export PYTHONPATH=.:$$PYTHONPATH; status=0; \
	$(PYTHON) -m pytest -q -rs tests/test_gpu.py tests/test_quadtree_triton.py tests/test_conv_triton.py tests/test_matching_triton.py || status=1; \
	$(PYTHON) eval/benchmark.py --device cuda --out $${OUT:-runs/benchmark_cuda} || status=1; \
	exit $$status
