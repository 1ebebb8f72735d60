# Two entry points for a fresh machine: `make demo` (the main job) and `make test`.
# Both create .venv on first use. Where torch is missing, the CPU build is installed
# first (on this kind of machine it comes from local disk in seconds).

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
TORCH  ?= torch==2.13.0

.PHONY: setup demo test test-all bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip 2>&1 | grep -v WARNING || true
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

demo: setup
	rm -rf runs/demo
	$(BIN)/moekit train --preset small --out runs/demo

test: setup
	$(BIN)/python -m pytest

test-all: setup
	$(BIN)/python -m pytest -m ""

clean:
	rm -rf $(VENV) runs .pytest_cache
