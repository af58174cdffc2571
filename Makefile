# Development tasks. `make help` lists them. Every Python command runs in $(VENV),
# which `make dev` creates; CI (`bash .ci/run`) runs the same commands from a clean checkout.
#
#   make dev                 # .venv + editable install with every extra (test, bench, demo, lint)
#   make build               # rebuild the Rust extension in place after a Rust change
#   make test                # cargo test, then pytest against torch.optim
#   make lint                # rustfmt, clippy (with and without the PyO3 glue), ruff, mypy
#   make bench               # the interleaved benchmark report (benches/report.py), minutes
#   make bench-quick         # every benchmark once, as CI does, and report.py --quick
#   make fmt                 # rewrite the sources as lint wants them (rustfmt, ruff)
#   make ci                  # the whole CI script (.ci/run) in a fresh virtual environment
#
# Variables: VENV=path (default .venv), VENV_FLAGS=--system-site-packages (reuse an installed
# torch instead of downloading one), SUITE=adamw,loop (bench: some suites only),
# PYTEST_ARGS=... (test: e.g. tests/test_parity.py -x), CARGO_BUILD_JOBS=1 (a shared machine).

VENV ?= .venv
VENV_FLAGS ?=
PY := $(VENV)/bin/python
SUITE ?= all
PYTEST_ARGS ?=
PY_DIRS := python tests benches examples

.PHONY: help dev build test lint fmt bench bench-quick ci

help:
	@sed -n 's/^#   make /make /p' $(firstword $(MAKEFILE_LIST))

$(PY):
	python3 -m venv $(VENV_FLAGS) $(VENV)
	$(PY) -m pip install --upgrade pip

# The editable install builds the extension with maturin (release profile: pyproject's
# [tool.maturin]); maturin itself is installed for `make build`.
dev: $(PY)
	$(PY) -m pip install -e ".[dev]" "maturin>=1.9,<2"

build: $(PY)
	$(PY) -m maturin --version >/dev/null 2>&1 || $(PY) -m pip install "maturin>=1.9,<2"
	VIRTUAL_ENV=$(abspath $(VENV)) $(PY) -m maturin develop --release

test: $(PY)
	cargo test
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(PY)
	cargo fmt --all -- --check
	cargo clippy --all-targets -- -D warnings
	cargo clippy --all-targets --features python -- -D warnings
	$(PY) -m ruff check $(PY_DIRS)
	$(PY) -m ruff format --check $(PY_DIRS)
	$(PY) -m mypy

# Rewrites the sources the way `make lint` wants them.
fmt: $(PY)
	cargo fmt --all
	$(PY) -m ruff check --fix $(PY_DIRS)
	$(PY) -m ruff format $(PY_DIRS)

bench: $(PY)
	$(PY) benches/report.py --suite $(SUITE)

bench-quick: $(PY)
	$(PY) -m pytest benches --benchmark-disable -q
	$(PY) benches/report.py --quick --suite $(SUITE) >/dev/null

ci:
	bash .ci/run
