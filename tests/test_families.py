"""Every stage on every supported family: a tiny random GPT-2, GPT-NeoX (Pythia), Llama and Qwen2,
built offline from their transformers config classes with the bundled tiny tokenizer, through
prepare, a few training steps of both methods (MFU included, against the CPU's measured peak),
evaluate and generate, in-process."""

import math

import pytest

from conftest import PREPARE_ARGS, reset_accelerate, run_main, train_args
from ftstudy.outputs import read_json
from ftstudy.synthetic import FAMILIES, local_params, write_corpus, write_params, write_tiny_model
from stages import evaluate, generate, prepare, train_full, train_lora

# PEFT's defaults per family, which lora.target_modules: auto resolves to.
AUTO_TARGETS = {"gpt2": ["c_attn"], "gpt_neox": ["query_key_value"], "llama": ["q_proj", "v_proj"],
                "qwen2": ["q_proj", "v_proj"]}


@pytest.fixture(params=list(FAMILIES))
def family_run(request, tmp_path, monkeypatch):
    family = request.param
    monkeypatch.chdir(tmp_path)
    write_tiny_model(family, tmp_path / "model")
    write_corpus(tmp_path / "corpus", {"train": 9_000, "validation": 2_000, "test": 2_000})
    write_params(tmp_path, local_params(tmp_path / "model", tmp_path / "corpus", **{
        "data.block_size": 32, "train.epochs": 1, "train.warmup_steps": 1, "train.log_every": 2,
        "train.eval_every": 0, "evaluate.stride": 16, "evaluate.bootstrap_samples": 100,
        "evaluate.bootstrap_chunk": 32, "generate.prompt": "The town of", "generate.extra_prompts": [],
        "generate.max_new_tokens": 8, "generate.num_samples": 1}))
    run_main(prepare, *PREPARE_ARGS)
    for stage, method in ((train_full, "full"), (train_lora, "lora")):
        run_main(stage, *train_args(method))
        reset_accelerate()
    for model in ("full", "lora"):
        run_main(evaluate, "--model", f"models/{model}", "--base", "pre", "--data", "prep", "--out",
                 f"m/evaluate/{model}.json", "--info", f"m/evaluate/{model}.info.json", "--nll", f"nll/{model}.npy")
    run_main(generate, "--model", "models/full", "--model", "models/lora", "--base", "pre", "--out", "gen",
             "--metrics", "m/generate")
    return family, tmp_path


def test_every_stage_runs_on_every_family(family_run):
    family, root = family_run
    meta = read_json(root / "prep/meta.json")
    # Llama's tokenizer starts each text with BOS, so each scored split does; the others add none.
    assert (meta["bos"] or {}).get("token") == ("<|begin_of_text|>" if family == "llama" else None)
    for method in ("full", "lora"):
        m, info = read_json(root / f"m/{method}.json")[method], read_json(root / f"m/{method}.info.json")
        assert info["steps"] >= 3 and math.isfinite(m["val_loss"])
        assert 0 < m["mfu"] < 1 and info["peak_flops_source"] == "measured, matmul probe"
    lora_info = read_json(root / "m/lora.info.json")
    assert lora_info["lora_target_modules"] == AUTO_TARGETS[family]
    for model in ("full", "lora"):
        ev = read_json(root / f"m/evaluate/{model}.json")[model]
        assert math.isfinite(ev["test_ppl"]) and ev["test_ppl_lo"] <= ev["test_ppl"] <= ev["test_ppl_hi"]
        protocol = read_json(root / f"m/evaluate/{model}.info.json")["protocol"]
        assert protocol["model"].endswith("model") and protocol["bos"] == meta["bos"]
    assert read_json(root / "gen/lora.json")["prompts"][0]["prompt"] == "The town of"
