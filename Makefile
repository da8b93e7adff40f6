# The two commands a new user needs: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PROMPT ?= What is the capital of France?
PORT ?= 50051
METRICS_PORT ?= 9464
HTTP_PORT ?= 8000

.PHONY: setup run serve test test-fast bench clean protos

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	$(BIN)/plan-engine models pull
	touch $@

run: setup  ## answer a question with the embedded default model (SmolLM2-135M-Instruct)
	$(BIN)/plan-engine run "$(PROMPT)" --chat

serve: setup  ## the gRPC control plane (and the OpenAI-compatible HTTP API) on the default model and plan
	$(BIN)/plan-engine serve --port $(PORT) --metrics-port $(METRICS_PORT) --http-port $(HTTP_PORT)

$(VENV)/.kernels-check: $(VENV)/.installed
	$(BIN)/python -m pip install --quiet -e '.[dev,kernels-check]'
	touch $@

test: setup $(VENV)/.kernels-check  ## the whole suite, as CI runs it (with the CPU-side CUDA kernel checks)
	$(BIN)/python -m pytest

test-fast: setup  ## skip the slow whole-model numerics tests (and the kernel checks if not installed)
	$(BIN)/python -m pytest -m "not slow"

bench: setup  ## prefill/decode throughput with the per-op profile, then continuous batching (f32 and the file's own blocks)
	$(BIN)/plan-engine bench --profile
	$(BIN)/plan-engine bench --concurrency 1,4,16,32
	$(BIN)/plan-engine bench --concurrency 1,4,16,32 --weights native

clean:
	rm -rf $(VENV) build *.egg-info

protos: setup  ## regenerate the Python code beside protos/*.proto
	$(BIN)/python -m protos.codegen
