# The two commands a newcomer needs: `make serve` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
HOST   ?= 127.0.0.1
PORT   ?= 8000
# torch is pinned to the CPU wheel (torch==2.13.0 in pyproject.toml); an unpinned torch pulls CUDA.
PIP_INSTALL := $(BIN)/python -m pip install --quiet

.PHONY: serve test lint install install-test install-bench bench-gateway clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP_INSTALL) --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(PIP_INSTALL) torch==2.13.0
	$(PIP_INSTALL) -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml $(VENV)/.installed tests/node/package-lock.json
	# llama-cpp-python compiles from source (needs g++ and cmake) for any x86-64 CPU with AVX2, not
	# for this one: a -march=native build on a CPU with AMX faults (general protection, in
	# ggml_backend_amx_mul_mat) where the kernel does not grant the process AMX's tile state.
	# Without pip's wheel cache, so that a native wheel built by an older Makefile is not reused.
	CMAKE_ARGS="-DGGML_NATIVE=OFF" CMAKE_BUILD_PARALLEL_LEVEL=2 \
		$(PIP_INSTALL) --no-cache-dir 'llama-cpp-python[server]==0.3.36'
	$(PIP_INSTALL) -e '.[test]'
	# the seed's TypeScript example runs under Node with the real openai package
	if command -v npm >/dev/null; then cd tests/node && npm ci --no-audit --no-fund --loglevel=error; fi
	touch $@

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test

# benchmarks: matplotlib and py-spy here; LiteLLM's proxy in a virtualenv of its own
install-bench: install-test
	$(PIP_INSTALL) matplotlib py-spy
	test -x .venv-litellm/bin/litellm || ($(PYTHON) -m venv .venv-litellm && \
		.venv-litellm/bin/python -m pip install --quiet 'litellm[proxy]')

bench-gateway: install-bench
	$(BIN)/python -m benchmarks.gateway --requests 300 --plot benchmarks/gateway.svg

serve: install
	$(BIN)/oculo serve --host $(HOST) --port $(PORT)

lint: install-test
	$(BIN)/ruff check src tests training benchmarks
	$(BIN)/ruff format --check src tests training benchmarks
	$(BIN)/mypy

test: lint
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) .venv-litellm .pytest_cache .mypy_cache .ruff_cache
