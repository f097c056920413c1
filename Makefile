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
	$(VENV)/bin/python benchmarks/scifact_index_quality.py
	$(VENV)/bin/python benchmarks/speed.py

clean:
	rm -rf $(VENV) .ragkit-demo
