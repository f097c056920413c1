# The two commands of README.md: `make run` (set up + main job) and `make test` (set up + tests).
VENV ?= .venv
export VENV

.PHONY: run test setup bench clean

setup: $(VENV)/.ragkit-installed

$(VENV)/.ragkit-installed: pyproject.toml scripts/install.sh
	bash scripts/install.sh

run: setup
	bash scripts/demo.sh

test: setup
	$(VENV)/bin/python -m pytest -q

bench: setup
	cd benchmarks && for b in scifact_index_quality search_speed scifact_hybrid quantisation \
	    scifact_embedder_finetune generate_speed selfrag_speed retrieval_latency qa_real_data \
	    rag_finetune_popqa selfrag_small_run; do ../$(VENV)/bin/python $$b.py || exit 1; done
	$(VENV)/bin/python benchmarks/render_results.py

clean:
	rm -rf $(VENV) .ragkit-demo
