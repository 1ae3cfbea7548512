# pgan: `make train` and `make test` set everything up on a fresh machine (a .venv in this folder).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
ARGS ?=

.PHONY: help install train test test-quick bench lint test-all clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -e '.[dev]'
	touch $(STAMP)

install: $(STAMP) ## create .venv and install pgan with its dev extras

train: $(STAMP) ## the default multi-stage run (8 -> 256 px, procedural shapes, small model); extra overrides in ARGS="..."
	$(VENV)/bin/pgan-train $(ARGS)

# The tests run in two pytest-xdist worker processes (each test still runs alone in its worker, torch on one
# thread: tests/conftest.py): on 2 cores about a third off the wall time. PYTEST_WORKERS= runs them in one process.
PYTEST_WORKERS ?= -n 2 --dist worksteal

test: $(STAMP) ## the fast test suite (no GPU, no network)
	$(PY) -m pytest -q $(PYTEST_WORKERS)

test-quick: $(STAMP) ## the in-process tests only, for a quick loop (no torchrun, servers or pgan-* processes)
	$(PY) -m pytest -q $(PYTEST_WORKERS) -m 'not slow and not distributed and not server and not subprocess'

bench: $(STAMP) ## pgan-bench: img/s, FLOPs, MFU, memory, loader speed of the training step (small model, 32-128 px); extra overrides in ARGS="..."
	$(VENV)/bin/pgan-bench $(ARGS)

lint: $(STAMP) ## ruff lint and format check
	$(VENV)/bin/ruff check pgan tests experiments
	$(VENV)/bin/ruff format --check pgan tests experiments

test-all: $(STAMP) ## every test, the slow ones too
	$(PY) -m pytest -q $(PYTEST_WORKERS) -m ''

clean: ## remove caches (keeps .venv and runs/)
	rm -rf .pytest_cache build *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
