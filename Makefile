# Set-up installs the CPU build of PyTorch first (an unpinned torch would pull a multi-GB CUDA build),
# then the package in editable mode with its test extras.
PYTHON ?= python3

.PHONY: install demo test test-all

install:
	$(PYTHON) -m pip install -q torch==2.13.0
	$(PYTHON) -m pip install -q -e ".[dev]"

demo: install
	$(PYTHON) demo/match_pair.py

test: install
	$(PYTHON) -m pytest -q -m "not slow"

test-all: install
	$(PYTHON) -m pytest -q
