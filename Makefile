# The README's two commands: `make demo` and `make test`. Both bootstrap .venv from a bare
# Python 3.10+ with pip, installing the four distributions editable.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYPROJECTS := pyproject.toml requirements-dev.txt $(wildcard backends/*/pyproject.toml adapters/*/pyproject.toml)

.PHONY: install demo test lint typecheck check pytest bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(BIN)/python $(PYPROJECTS)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/python -m embserve run examples/quickstart.py:app --host 127.0.0.1 --port 8000

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

typecheck: install
	$(BIN)/mypy

check: lint typecheck

pytest: install
	$(BIN)/python -m pytest

test: check pytest

bench: install
	$(BIN)/python benchmarks/handles.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .hypothesis
