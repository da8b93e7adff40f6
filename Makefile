# The two commands a new user needs: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PROMPT ?= What is the capital of France?
PORT ?= 50051
METRICS_PORT ?= 9464
HTTP_PORT ?= 8000
# The container image (deploy/Dockerfile) and its baked-model variant ($(IMAGE)-model).
VERSION := $(shell sed -n 's/^version = "\(.*\)"$$/\1/p' pyproject.toml)
IMAGE ?= plan-engine:$(VERSION)
CONTAINER_ENGINE ?= $(shell command -v podman || command -v docker)
BASE_IMAGE ?=# empty: the Dockerfile's python:3.11 slim; .ci/containers.sh makes a Debian one offline
IMAGE_BUILD_FLAGS ?=

.PHONY: setup run serve test test-fast test-containers image bench bench-vs-llamacpp clean protos traces tune

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
	$(BIN)/python -m pytest -m "not slow and not container"

test-containers: setup  ## build the image and run it with podman: tests/deploy/, measurements printed (.ci/containers.sh sets podman up)
	$(BIN)/python -m pytest tests/deploy -m container -s

# podman: --format docker keeps HEALTHCHECK (OCI images have no field for it); --ignorefile is the
# allowlist BuildKit finds beside the Dockerfile; RUN steps use the host network and trust the
# host's CA bundle (a proxy that re-signs TLS, as here, would fail pip otherwise).
ifneq ($(findstring podman,$(CONTAINER_ENGINE)),)
ENGINE_BUILD_FLAGS := --format docker --ignorefile deploy/Dockerfile.dockerignore --network host \
	$(if $(wildcard /etc/ssl/certs/ca-certificates.crt),--volume /etc/ssl/certs:/etc/ssl/certs:ro)
endif
image:  ## build the container image $(IMAGE) and $(IMAGE)-model (the default model baked in)
	@test -n "$(CONTAINER_ENGINE)" || { echo "make image: neither podman nor docker is installed" >&2; exit 1; }
	$(CONTAINER_ENGINE) build $(ENGINE_BUILD_FLAGS) $(IMAGE_BUILD_FLAGS) -f deploy/Dockerfile \
		$(if $(BASE_IMAGE),--build-arg PYTHON_IMAGE=$(BASE_IMAGE)) -t $(IMAGE) .
	$(CONTAINER_ENGINE) build $(ENGINE_BUILD_FLAGS) $(IMAGE_BUILD_FLAGS) -f deploy/Dockerfile \
		$(if $(BASE_IMAGE),--build-arg PYTHON_IMAGE=$(BASE_IMAGE)) --build-arg BAKE_MODEL=1 -t $(IMAGE)-model .

bench: setup  ## prefill/decode throughput with the per-op profile, then continuous batching (f32 and the file's own blocks)
	$(BIN)/plan-engine bench --profile
	$(BIN)/plan-engine bench --concurrency 1,4,16,32
	$(BIN)/plan-engine bench --concurrency 1,4,16,32 --weights native

traces: setup  ## regenerate the shipped load traces (deploy/traces/, docs/05_weos_integration.md)
	$(BIN)/plan-engine trace generate --kind steady_chat --seed 1 --duration 60 --rate 0.5 -o deploy/traces/steady_chat.jsonl
	$(BIN)/plan-engine trace generate --kind bursty_batch --seed 2 --duration 30 --burst 8 --period 15 -o deploy/traces/bursty_batch.jsonl

tune: setup  ## the tuning agent on both shipped traces: bad trial rolled back, then final vs default, interleaved
	$(BIN)/plan-engine tune --trace deploy/traces/bursty_batch.jsonl --goal max_tokens_per_s --max-ttft 10 --bad-trial
	$(BIN)/plan-engine tune --trace deploy/traces/steady_chat.jsonl --goal min_joules_per_token --max-ttft 10 --max-itl 2

bench-vs-llamacpp: setup  ## ours vs llama.cpp on a 1B llama-shaped model (Q4_K_M, Q4_0, Q8_0, Q6_K): builds llama.cpp's tools once, makes the models, prints the table
	$(BIN)/python benchmarks/bench_vs_llamacpp.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info

protos: setup  ## regenerate the Python code beside protos/*.proto
	$(BIN)/python -m protos.codegen
