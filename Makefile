# Set-up is part of every target: the first call creates .venv (torch first, pinned to the CPU wheel),
# later calls reuse it. Re-installs when pyproject.toml changes.
VENV ?= .venv
PY := $(VENV)/bin/python
ARGS ?=

.PHONY: simulate test lint bench

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip || true
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	touch $@

simulate: $(VENV)/.installed
	$(VENV)/bin/fedpriv simulate $(ARGS)

test: $(VENV)/.installed
	$(PY) -m pytest -q $(ARGS)

# ruff, then the import contract in pyproject.toml ([tool.importlinter]): no module imports a layer above it.
lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports
