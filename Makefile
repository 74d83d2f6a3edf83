# The README's two commands: `make demo` and `make test`. Both bootstrap .venv from a bare
# Python 3.10+ with pip, installing the four distributions editable.
PYTHON ?= python3
PORT ?= 8000
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYPROJECTS := pyproject.toml requirements-dev.txt $(wildcard backends/*/pyproject.toml adapters/*/pyproject.toml)

.PHONY: install demo test lint typecheck docs check pytest bench dist clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(BIN)/python $(PYPROJECTS)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $(STAMP)

install: $(STAMP)

# `make demo PORT=8001` when 8000 is taken.
demo: install
	$(BIN)/python -m embserve run examples/quickstart.py:app --host 127.0.0.1 --port $(PORT)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

typecheck: install
	$(BIN)/mypy

# The docs site, into the git-ignored site/; --strict fails on any warning (a broken link, a
# docstring mkdocstrings cannot render).
docs: install
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet

check: lint typecheck docs

pytest: install
	$(BIN)/python -m pytest

test: check pytest

bench: install
	$(BIN)/python benchmarks/handles.py

# Wheels of the four distributions in dist/, so that anywhere (a fresh virtualenv, a Dask
# worker, an image) `pip install --find-links dist 'embserve[asgi,process,dask]'` installs them.
DISTRIBUTIONS := . adapters/asgi backends/process backends/dask
DIST ?= dist
dist: install
	rm -rf $(DIST)
	for d in $(DISTRIBUTIONS); do $(BIN)/python -m build --wheel --outdir $(DIST) $$d || exit 1; done
	rm -rf build adapters/asgi/build backends/process/build backends/dask/build

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .hypothesis site dist
