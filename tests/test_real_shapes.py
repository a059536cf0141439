"""GPT-2 124M's real shapes on CPU: the exact config at random init, the real tokenizer and
1,024-token blocks, through the real stages (each its own process, as under DVC, so each peak RSS
is its own): prepare, one training step of each method, then evaluate and generate on the LoRA
model (base plus adapter, the longer path), on a small corpus."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import PREPARE_ARGS, ROOT, once, train_args
from ftstudy import runtime
from ftstudy.data import token_files
from ftstudy.outputs import read_json
from ftstudy.synthetic import local_params, write_corpus, write_gpt2_124m, write_params
from ftstudy.train import memory

# One pytest-xdist worker runs this file: its module-scoped fixtures are built once.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("real_shapes")]


def stage(root, module: str, *args: str) -> None:
    env = os.environ | {"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", f"stages.{module}", *args], cwd=root, env=env,
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return once("real-shapes", lambda: run_real_shapes(tmp_path_factory.mktemp("real-shapes")))


def run_real_shapes(root):
    write_gpt2_124m(root / "gpt2-random")
    # One block of 1,024 tokens (and a little) for each split.
    write_corpus(root / "corpus", {"train": 4_200, "validation": 4_200, "test": 4_200})
    write_params(root, local_params(root / "gpt2-random", root / "corpus", **{
        "data.block_size": 1024, "train.epochs": 1, "train.batch_size": 1, "train.warmup_steps": 0,
        "train.log_every": 1, "evaluate.stride": 512, "evaluate.batch_size": 2, "evaluate.bootstrap_chunk": 32,
        "generate.extra_prompts": [], "generate.test_prompts": 1, "generate.num_samples": 1, "generate.max_new_tokens": 8}))
    stage(root, "prepare", *PREPARE_ARGS)
    for method in ("full", "lora"):
        stage(root, f"train_{method}", *train_args(method))
    stage(root, "evaluate", "--model", "models/lora", "--base", "pre", "--data", "prep",
          "--out", "m/evaluate/lora.json", "--info", "m/evaluate/lora.info.json", "--nll", "nll/lora.npz")
    stage(root, "generate", "--model", "models/lora", "--base", "pre", "--data", "prep", "--out", "gen", "--metrics", "m/generate")
    stage(root, "updates", "--base", "pre", "--full", "models/full", "--lora", "models/lora", "--out", "m/updates.json",
          "--info", "m/updates.info.json", "--values", "updates.npz")
    return root


def test_the_updates_step_runs_at_124m_and_its_time_is_recorded(run):
    """Every linear layer of GPT-2 124M's 12 blocks (48 matrices, 768 to 3,072 wide): about five SVDs
    each, the stage's seconds recorded in its info (docs/performance.md, "The updates step")."""
    info = read_json(run / "m/updates.info.json")
    summary = read_json(run / "m/updates.json")["updates"]
    assert len(info["layers"]) == summary["full"]["matrices"] == 48
    assert {tuple(row["shape"]) for row in info["layers"]} == {(2304, 768), (768, 768), (3072, 768), (768, 3072)}
    print(f"\nreal shapes: the updates step took {info['seconds']:.1f} s for 48 matrices on {info['device']}")


def test_tokens_are_uint16_for_gpt2s_vocabulary(run):
    meta = token_files.read_meta(run / "prep")
    assert meta["vocab_size"] == 50257 and meta["dtype"] == "<u2"
    assert token_files.load_tokens(run / "prep", "train").dtype == np.dtype("<u2")
    assert token_files.blocks(token_files.load_tokens(run / "prep", "train"), 1024).shape[0] == 1


def test_training_runs_at_124m_with_the_expected_lora_count(run):
    full = read_json(run / "m/full.json")["full"] | read_json(run / "m/full.info.json")
    lora = read_json(run / "m/lora.json")["lora"] | read_json(run / "m/lora.info.json")
    assert full["trainable_params"] == full["total_params"] == 124_439_808
    assert lora["trainable_params"] == 1_179_648  # every linear layer of 12: 8 x (3072 + 1536 + 2 x 3840) each
    assert lora["total_params"] == 124_439_808 + 1_179_648
    assert lora["merge_max_abs_diff"] < 1e-3
    for m in (full, lora):
        assert m["steps"] == 1 and np.isfinite(m["final_train_loss"]) and m["peak_mem_kind"] == "cpu_peak_rss"
    # Peak RSS of each training process, recorded here and in the test output, beside the memory plan.
    print(f"\nreal shapes: peak RSS full {full['peak_mem_gib']:.2f} GiB (planned {full['memory_plan_gib']['total']:.2f}), "
          f"lora {lora['peak_mem_gib']:.2f} GiB (planned {lora['memory_plan_gib']['total']:.2f})")
    (run / "peak_rss.json").write_text(json.dumps({m: {"measured": r["peak_mem_gib"], "planned": r["memory_plan_gib"]}
                                                   for m, r in (("full", full), ("lora", lora))}))
    assert full["peak_mem_gib"] < 8 and lora["peak_mem_gib"] < 8
    for r in (full, lora):  # the plan made before the weights loaded, against the measured peak
        assert abs(r["memory_plan_gib"]["total"] - r["peak_mem_gib"]) <= memory.TOLERANCE * r["peak_mem_gib"], r


def test_flops_per_token_of_the_real_config():
    from transformers import GPT2Config, GPT2LMHeadModel

    with torch.device("meta"):
        model = GPT2LMHeadModel(GPT2Config())
    # N: every parameter but the position table (786,432); the token table counts once, as the head.
    assert runtime.matmul_params(model) == (124_439_808 - 1024 * 768,) * 2
    n = 124_439_808 - 1024 * 768
    assert runtime.flops_per_token(GPT2Config(), n, n, 1024) == 6 * n + 12 * 12 * 768 * 1024
    assert runtime.flops_per_token(GPT2Config(), n, 0, 1024) == 4 * n + 12 * 12 * 768 * 1024


def test_evaluate_and_generate_at_1024_context(run):
    ev = read_json(run / "m/evaluate/lora.json")["lora"]
    info = read_json(run / "m/evaluate/lora.info.json")
    assert info["protocol"]["context"] == 1024 and info["protocol"]["tokenizer"].endswith("gpt2-random")
    # Random weights over 50,257 tokens: perplexity near the vocabulary size, finite.
    assert 1_000 < ev["test_ppl"] < 500_000 and ("test_ppl_lo" in ev) == (ev["test_chunks"] >= 20)
    assert ev.get("test_ppl_lo", 0) <= ev["test_ppl"] <= ev.get("test_ppl_hi", math.inf)
    gen = read_json(run / "gen/lora.json")["prompts"]
    assert len(gen) == 1 and len(gen[0]["samples"]) == 1
    assert read_json(run / "m/generate/lora.json")["lora"]["texts"] in (1, 2)  # distinct continuations
