# The two README commands: `make serve` and `make test`. Both set up .venv/ when needed.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
HOST ?= 127.0.0.1
PORT ?= 8000
STUDIES ?= sample-data
CONF ?=
PYTEST_ARGS ?=

.PHONY: setup serve test clean

setup: $(STAMP)

$(STAMP): requirements.txt requirements-monailabel.txt pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info[:2] >= (3, 11), "Python 3.11+ is required"'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -r requirements-monailabel.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation --editable .
	$(PY) -c 'import monailabel.app, lib.configs.spine' > /dev/null
	touch $(STAMP)

serve: setup
	$(PY) -m monailabel.main start_server --app apps/spine --studies $(STUDIES) --host $(HOST) --port $(PORT) $(CONF)

test: setup
	$(PY) -m pytest $(PYTEST_ARGS) tests

clean:
	rm -rf $(VENV)
