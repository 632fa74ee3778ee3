# Both targets create .venv on first use and install everything into it.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test,examples]"
	touch $@

.PHONY: demo test test-all bench
demo: $(VENV)/.installed  ## compile the bundled EfficientNet-Lite0 example and print its rows
	$(PY) -m examples.demo

test: $(VENV)/.installed  ## the default suite (unit tests + a representative real-model test)
	$(PY) -m pytest -q

test-all: $(VENV)/.installed  ## every test, including all slow real-model tests
	$(PY) -m pytest -q -m ""

bench: $(VENV)/.installed  ## the full benchmark table -> benchmarks/results/
	$(PY) -m benchmarks.run
