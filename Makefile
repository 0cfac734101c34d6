# The two commands a newcomer runs: `make test` and `make figures`. Both create the
# virtual environment on first use and install the package with its pinned dependencies.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup test test-fast derivations figures figures-quick bench clean

setup: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[test]'
	touch $@

test: $(STAMP)
	$(PY) -m pytest

test-fast: $(STAMP)
	$(PY) -m pytest -m "not gate"

derivations: $(STAMP)
	$(PY) -m derivations

clean:
	rm -rf figures/out .pytest_cache
