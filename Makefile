# distillm: two commands.  `make demo` runs the whole study offline and writes runs/demo/report.md;
# `make test` runs the test suite.
#
# On a machine with a GPU, override the torch requirement, e.g.
#   make install TORCH_SPEC='torch>=2.4'        (lets pip pick a CUDA build)
# The default pins the CPU build that this project's CI machines have locally.

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= dev
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The extras of the last install: rewritten only when EXTRAS changes, so that a change reinstalls.
EXTRAS_STAMP := $(VENV)/.extras

.PHONY: install demo test test-all lint format clean gpu-wheels FORCE

install: $(STAMP)

$(EXTRAS_STAMP): FORCE
	@mkdir -p $(VENV)
	@echo '$(EXTRAS)' | cmp -s - $@ || echo '$(EXTRAS)' > $@

$(STAMP): pyproject.toml Makefile $(EXTRAS_STAMP)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[$(EXTRAS)]" "$(TORCH_SPEC)"
	touch $(STAMP)

# The whole study on the bundled task suite (about 10 minutes on 2 idle CPU cores); reruns reuse finished stages.
demo: install
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false $(VENV)/bin/distillm demo --out runs/demo

# HF_HUB_OFFLINE: the tests never touch the network; every model and tokenizer is built locally.
test: install
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false $(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

format: install
	$(VENV)/bin/ruff check --fix src tests benchmarks
	$(VENV)/bin/ruff format src tests benchmarks

# Wheels of the packages benchmarks/gpu_check.sh needs on the lent GPU machine and its image lacks, for its
# Python 3.12, into .whl/ (ignored by git; carried to the device with the working tree, 64 MiB in all).
gpu-wheels:
	PY=$(PYTHON) bash benchmarks/gpu_wheels.sh

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache
