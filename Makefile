# `make serve` and `make test` do all set-up on a fresh machine with Python 3.11.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8000
REPO ?= models
# The exact versions CI tested (see its header); `make lock` rewrites it.
CONSTRAINTS := constraints.txt
PIP := $(BIN)/python -m pip install -c $(CONSTRAINTS)

.PHONY: install install-test install-bench system-deps kernels serve test check format bench models proto lock clean

# Each install also compiles the drift kernels ahead of time (`tidegate kernels build`,
# into the kernel cache), so the first serve loads them instead of building them; without
# a C compiler that step fails (ignored: `-`) and servers run Numba's JIT instead, at
# ~120 MiB more each.
$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# The stamp files re-run pip only when pyproject.toml or the constraints change. pip
# first moves itself to its pinned version. An install with extras also installs
# tidegate, so it stamps the plain install as done too.
$(VENV)/.installed: pyproject.toml $(CONSTRAINTS) | $(BIN)/python
	$(PIP) pip
	$(PIP) -e .
	-$(BIN)/tidegate kernels build
	touch $@

$(VENV)/.installed-test: pyproject.toml $(CONSTRAINTS) | $(BIN)/python
	$(PIP) pip
	$(PIP) -e '.[test]'
	-$(BIN)/tidegate kernels build
	touch $@ $(VENV)/.installed

$(VENV)/.installed-bench: pyproject.toml $(CONSTRAINTS) | $(BIN)/python
	$(PIP) pip
	$(PIP) -e '.[bench]'
	-$(BIN)/tidegate kernels build
	touch $@ $(VENV)/.installed

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

# Programs the tests drive that pip does not install, as command:Debian-package pairs:
# Chromium for the dashboard's browser tests, promtool (Debian's prometheus package) for
# the alert rules'. As root (CI) the missing ones are installed; otherwise the exact
# command to run is printed.
SYSTEM_TOOLS := chromium:chromium promtool:prometheus

system-deps:
	@missing=; for pair in $(SYSTEM_TOOLS); do \
		command -v "$${pair%%:*}" >/dev/null || missing="$$missing $${pair#*:}"; done; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ]; then \
		apt-get update && DEBIAN_FRONTEND=noninteractive \
			apt-get install --yes --no-install-recommends $$missing; \
	else \
		echo "make test needs:$$missing. Run:" >&2; \
		echo "  sudo apt-get update && sudo apt-get install --yes --no-install-recommends$$missing" >&2; \
		exit 1; \
	fi

test: check system-deps
	$(BIN)/python -m pytest

format: install-test
	$(BIN)/ruff format src tests scripts benchmarks
	$(BIN)/ruff check --fix src tests scripts benchmarks

models: install-test
	$(BIN)/python scripts/build_models.py models

# The Python code of the gRPC protocol, from src/tidegate/proto/*.proto (committed; see
# the script and that package's docstring).
proto: install-test
	PYTHON=$(BIN)/python scripts/gen_proto.sh

bench: install-bench
	$(BIN)/python benchmarks/bench_hotpath.py
	$(BIN)/python benchmarks/bench_http.py

# Re-resolve every dependency in a fresh venv (no constraints) and pin the result.
lock:
	@tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && set -e && \
	$(PYTHON) -m venv "$$tmp/venv" && \
	"$$tmp/venv/bin/python" -m pip install --upgrade pip && \
	"$$tmp/venv/bin/python" -m pip install -e '.[test,bench]' && \
	"$$tmp/venv/bin/python" scripts/lock.py $(CONSTRAINTS)

clean:
	rm -rf $(VENV)
