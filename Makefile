# Every target creates .venv on first use and installs everything into it; test also creates .venv-training.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test,examples]"
	touch $@

# AdaQuant's optional onnxruntime-training engine (onnxptq/training): its own environment, because
# onnxruntime-training-cpu installs into the same `onnxruntime` package as current onnxruntime. 1.19.2 is
# the last release (wheels up to cp312); onnx < 1.17 writes IR versions onnxruntime 1.19 reads. No torch.
PYTHON_TRAINING ?= python3.11
TRAINING_VENV := .venv-training
TRAINING_REQUIREMENTS := onnxruntime-training-cpu==1.19.2 "onnx>=1.15,<1.17" "numpy>=1.26"

$(TRAINING_VENV)/.installed:
	$(PYTHON_TRAINING) -m venv $(TRAINING_VENV)
	$(TRAINING_VENV)/bin/python -m pip install --quiet $(TRAINING_REQUIREMENTS)
	touch $@

.PHONY: demo test test-all bench test-training
demo: $(VENV)/.installed  ## compile the bundled EfficientNet-Lite0 example and print its rows
	$(PY) -m examples.demo

test: $(VENV)/.installed $(TRAINING_VENV)/.installed  ## the default suite: unit tests, a representative real-model test, the training engine's tests
	$(PY) -m pytest -q

test-training: $(VENV)/.installed $(TRAINING_VENV)/.installed  ## AdaQuant's engine-agreement tests (onnxruntime-training)
	$(PY) -m pytest -q -m training

test-all: $(VENV)/.installed  ## every test, including all slow real-model tests
	$(PY) -m pytest -q -m ""

bench: $(VENV)/.installed  ## the full benchmark table -> benchmarks/results/
	$(PY) -m benchmarks.run
