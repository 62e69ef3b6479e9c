# The two commands of the README:
#   make demo   - set up .venv with what the demo needs and run the digits demo (the embedded default world)
#   make test   - set up .venv with the dev extras too and run the test suite
# Set-up happens once (and again when pyproject.toml changes). GPU users: see docs/gpus.md.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
BASE := $(VENV)/.xdpo-base-installed
STAMP := $(VENV)/.xdpo-installed

.PHONY: setup demo test lint

setup: $(STAMP)

# xdpo and its dependencies only: what `xdpo demo` runs on (no DeepSpeed, no bitsandbytes)
$(BASE): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first, pinned: an unpinned torch would pull a multi-GB CUDA build on CPU machines
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e .
	touch $(BASE)

# the dev extras on top (pytest, ruff, bitsandbytes, deepspeed) for the tests
$(STAMP): $(BASE)
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	# only its CLIP BPE vocabulary file is read (to build tokenizers); --no-deps keeps torchvision out
	$(BIN)/python -m pip install --quiet --no-deps open_clip_torch
	touch $(STAMP)

demo: $(BASE)
	$(BIN)/xdpo demo $(ARGS)

# JOBS test workers (pytest-xdist); each test runs one torch thread, so one worker per core
JOBS ?= 2
test: $(STAMP)
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/python -m pytest -q -n $(JOBS) --dist worksteal $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
