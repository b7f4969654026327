# `make serve` and `make test` do all set-up on a fresh machine with Python 3.11.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8000
REPO ?= models

.PHONY: install install-test install-bench kernels serve test check format bench models clean

# The stamp files re-run pip only when pyproject.toml changes. Each install also compiles
# the drift kernels ahead of time (`tidegate kernels build`, into the kernel cache), so
# the first serve loads them instead of building them; without a C compiler that step
# fails (ignored: `-`) and servers run Numba's JIT instead, at ~120 MiB more each.
$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -e .
	-$(BIN)/tidegate kernels build
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -e '.[test]'
	-$(BIN)/tidegate kernels build
	touch $@

$(VENV)/.installed-bench: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -e '.[bench]'
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test
install-bench: $(VENV)/.installed-bench

# Again, e.g. after a change to the kernels (the cache key changes with their source).
kernels: install
	$(BIN)/tidegate kernels build

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
