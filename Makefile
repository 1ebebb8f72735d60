# Two entry points for a fresh machine: `make demo` (the main job) and `make test`.
# Both create .venv on first use. Where torch is missing, the CPU build is installed
# first (on this kind of machine it comes from local disk in seconds). The install
# compiles moekit's C kernels (setup.py; without a C compiler they are skipped).

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
TORCH  ?= torch==2.13.0

.PHONY: setup demo test test-all bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml setup.py $(wildcard moekit/moe/_qdot*.c moekit/moe/_qdot*.h)
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

# The benchmarks' peer, llama.cpp, built from source (10+ minutes): the AVX-512 + VNNI build into .venv (the
# bench extra) and the AVX2 build into .llama-avx2 (cpu_decode.py --llama-avx2 .llama-avx2). AMX stays off.
LLAMA_COMMON := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF
bench: setup
	CMAKE_ARGS="$(LLAMA_COMMON) -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_BF16=ON -DGGML_AVX_VNNI=ON" \
		$(BIN)/python -m pip install -q --no-binary llama-cpp-python -e ".[bench]"
	CMAKE_ARGS="$(LLAMA_COMMON) -DGGML_AVX512=OFF" \
		$(BIN)/python -m pip install -q --no-binary llama-cpp-python --no-deps --target .llama-avx2 "llama-cpp-python>=0.3.30,<0.4"

clean:
	rm -rf $(VENV) runs .pytest_cache .llama-avx2
