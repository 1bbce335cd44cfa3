# Two commands do everything on a fresh machine: `make run` (set up, then the main job) and `make test`
# (set up, then the tests). Set-up creates .venv, installs CPU torch first (so nothing pulls a CUDA build),
# then moelm with its dev extra; it reruns only when pyproject.toml changes, so later calls start at once.

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
OUT ?= runs/quickstart
STAMP := $(VENV)/.moelm-setup
BIN := $(VENV)/bin

.PHONY: setup run test test-slow lint

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

# The main job; --resume makes a second `make run` skip the finished stages of the same run instead of refusing it.
run: setup
	$(BIN)/moelm quickstart --out $(OUT) --resume

test: setup
	$(BIN)/python -m pytest -q

test-slow: setup
	$(BIN)/python -m pytest -q -m slow

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
