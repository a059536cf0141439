DIR ?= .demo
PYTHON ?= python

.PHONY: demo test assets bench

# The whole pipeline, offline on CPU, on the bundled tiny assets, in a sandbox at $(DIR).
demo:
	$(PYTHON) scripts/sandbox.py $(DIR) --repro
	@cat $(DIR)/metrics/report.md

test:
	$(PYTHON) -m pytest

# Rebuild the bundled tiny assets (deterministic; a few minutes on 2 cores).
assets:
	$(PYTHON) assets/build_assets.py

# Speed and memory, side by side in one run (GPU: GPT-2 124M; CPU: the tiny model). Writes bench-results.json.
bench:
	$(PYTHON) scripts/bench.py
