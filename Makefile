# The two commands a new user needs: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PROMPT ?= What is the capital of France?

.PHONY: setup run test test-fast bench clean protos

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	$(BIN)/plan-engine models pull
	touch $@

run: setup  ## answer a question with the embedded default model (SmolLM2-135M-Instruct)
	$(BIN)/plan-engine run "$(PROMPT)" --chat

test: setup  ## the whole suite, as CI runs it
	$(BIN)/python -m pytest

test-fast: setup  ## skip the slow whole-model numerics tests
	$(BIN)/python -m pytest -m "not slow"

bench: setup  ## prefill/decode throughput and the per-op profile
	$(BIN)/plan-engine bench --profile

clean:
	rm -rf $(VENV) build *.egg-info

protos: setup  ## regenerate services/api from protos/
	$(BIN)/python -m services.api.codegen
