# One command per chore. `make run` and `make test` set up .venv on a fresh machine first.
#
#   make run     the embedded default: API on :8000 + one worker, SQLite, no servers
#   make test    the whole test suite (needs Postgres on :5432 and Redis on :6379)
#   make lint    ruff, mypy, import-linter
#   make bench   the benchmarks (engine table, service figures, load throughput)

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# Re-install only when the pins change: the stamp is newer than both files otherwise.
STAMP  := $(VENV)/.modelpress-installed
# torch first, pinned: pip then takes the CPU wheel on this disk. A bare `torch` requirement
# resolved by pip on an empty venv would pull a multi-GB CUDA build.
TORCH  := torch==2.13.0

.PHONY: run test lint bench bench-engine bench-service bench-load venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -r requirements.lock
	$(BIN)/python -m pip install -q -e . --no-deps
	touch $@

run: $(STAMP)
	$(BIN)/modelpress serve

test: $(STAMP)
	$(BIN)/pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/lint-imports

bench: bench-engine bench-service bench-load

bench-engine: $(STAMP)
	test ! -f bench/engine.py || $(BIN)/python -m bench.engine

bench-service: $(STAMP)
	$(BIN)/python -m bench.service

bench-load: $(STAMP)
	$(BIN)/python -m bench.load

clean:
	rm -rf var/ .pytest_cache .mypy_cache .ruff_cache
