# Two commands do all set-up on a fresh machine with python3 and make:
#   make demo   - install into .venv and run RL (DiffusionNFT) on the RL-ready shapes model, all six tags (about 10 min on 2 CPU cores)
#   make test   - install with the dev extras and run the test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch first, from the pinned CPU build: a bare "torch" requirement would pull a CUDA build.
TORCH_SPEC ?= torch==2.13.0
# pip says only what went wrong (errors), not the notices of the machine's package index settings
PIP_QUIET ?= --quiet --quiet

.PHONY: demo test install install-dev clean-runs

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install $(PIP_QUIET) --upgrade pip
	$(BIN)/pip install $(PIP_QUIET) $(TORCH_SPEC)

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install $(PIP_QUIET) -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(BIN)/pip install $(PIP_QUIET) -e ".[dev,ocr]"
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

demo: install
	$(BIN)/flowgrpo train configs/demo_six.yaml

test: install-dev
	$(BIN)/python -m pytest -q

clean-runs:
	rm -rf runs/demo runs/demo_six
