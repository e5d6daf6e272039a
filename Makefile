# Quick start: `make repro` (set up, then run the default CPU pipeline) and `make test`.
# TORCH pins the PyTorch build; the default is the CPU wheel 2.13.0. On a GPU machine use e.g.
# `make repro TORCH=torch==2.13.0` with your CUDA index configured for pip.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: setup repro test lint

$(BIN)/sdip: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[pipeline,dev,cluster]"
	touch $@

setup: $(BIN)/sdip

repro: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro

test: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/pytest

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .
