# `make serve` and `make test` do all set-up on a fresh machine with Python 3.11.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8000
REPO ?= models

.PHONY: install install-test install-bench serve test check format bench models clean

# The stamp files re-run pip only when pyproject.toml changes.
$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -e '.[test]'
	touch $@

$(VENV)/.installed-bench: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -e '.[bench]'
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test
install-bench: $(VENV)/.installed-bench

serve: install
	$(BIN)/tidegate serve $(REPO) --host $(HOST) --port $(PORT)

check: install-test
	$(BIN)/ruff format --check src tests scripts benchmarks
	$(BIN)/ruff check src tests scripts benchmarks
	$(BIN)/mypy

test: check
	$(BIN)/python -m pytest

format: install-test
	$(BIN)/ruff format src tests scripts benchmarks
	$(BIN)/ruff check --fix src tests scripts benchmarks

models: install-test
	$(BIN)/python scripts/build_models.py models

bench: install-bench
	$(BIN)/python benchmarks/bench_hotpath.py
	$(BIN)/python benchmarks/bench_http.py

clean:
	rm -rf $(VENV)
