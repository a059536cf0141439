"""Every stage on every supported family: a tiny random GPT-2, GPT-NeoX (Pythia), Llama, Qwen2 and
Phi (an untied head with a bias), built offline from their transformers config classes with the
bundled tiny tokenizer, through prepare, a few training steps of both methods (MFU included,
against the CPU's measured peak), evaluate and generate, in-process. Training lowers the loss, and
evaluate's perplexity equals the model's own forward and logits scoring every token."""

import math

import pytest
import torch

from conftest import PREPARE_ARGS, once, reset_accelerate, run_main, train_args
from ftstudy import modeling
from ftstudy.data import token_files
from ftstudy.measure import scoring, stats
from ftstudy.outputs import read_json
from ftstudy.synthetic import FAMILIES, local_params, write_corpus, write_params, write_tiny_model
from stages import evaluate, generate, prepare, train_full, train_lora, updates

# One pytest-xdist worker runs this file: its module-scoped fixtures are built once.
pytestmark = pytest.mark.xdist_group("families")

# PEFT's defaults per family, which lora.target_modules: auto resolves to.
AUTO_TARGETS = {"gpt2": ["c_attn"], "gpt_neox": ["query_key_value"], "llama": ["q_proj", "v_proj"],
                "qwen2": ["q_proj", "v_proj"], "phi": ["q_proj", "v_proj", "fc1", "fc2"]}


@pytest.fixture(params=list(FAMILIES), scope="module")
def family_run(request, tmp_path_factory):
    """One family's whole run, shared by the tests of this module (read-only); built once per
    family and test process (conftest.once)."""
    family = request.param

    def build():
        tmp_path = tmp_path_factory.mktemp(family)
        with pytest.MonkeyPatch.context() as monkeypatch:
            monkeypatch.chdir(tmp_path)
            _run_every_stage(family, tmp_path)
        return family, tmp_path

    return once(("families", family), build)


def _run_every_stage(family, tmp_path):
    write_tiny_model(family, tmp_path / "model")
    write_corpus(tmp_path / "corpus", {"train": 9_000, "validation": 2_000, "test": 2_000})
    write_params(tmp_path, local_params(tmp_path / "model", tmp_path / "corpus", **{
        "data.block_size": 32, "train.epochs": 1, "train.warmup_steps": 1, "train.log_every": 2,
        "train.eval_every": 0, "full.lr": 2e-3, "lora.lr": 1e-2, "evaluate.stride": 16,
        "lora.target_modules": "auto",  # each family's PEFT default (the shipped all-linear is family-blind)
        "evaluate.bootstrap_samples": 100, "evaluate.bootstrap_chunk": 16,
        "generate.prompt": "The town of", "generate.extra_prompts": [],
        "generate.max_new_tokens": 8, "generate.num_samples": 1}))
    run_main(prepare, *PREPARE_ARGS)
    for stage, method in ((train_full, "full"), (train_lora, "lora")):
        run_main(stage, *train_args(method))
        reset_accelerate()
    for model in ("full", "lora"):
        run_main(evaluate, "--model", f"models/{model}", "--base", "pre", "--data", "prep", "--out",
                 f"m/evaluate/{model}.json", "--info", f"m/evaluate/{model}.info.json", "--nll", f"nll/{model}.npz")
    run_main(generate, "--model", "models/full", "--model", "models/lora", "--base", "pre", "--data", "prep", "--out", "gen",
             "--metrics", "m/generate")
    run_main(updates, "--base", "pre", "--full", "models/full", "--lora", "models/lora", "--out", "m/updates.json",
             "--info", "m/updates.info.json", "--values", "updates.npz")
    reset_accelerate()


def test_every_stage_runs_on_every_family(family_run):
    family, root = family_run
    meta = read_json(root / "prep/meta.json")
    # Llama's tokenizer starts each text with BOS, so each scored split does; the others add none.
    assert (meta["bos"] or {}).get("token") == ("<|begin_of_text|>" if family == "llama" else None)
    for method in ("full", "lora"):
        m, info = read_json(root / f"m/{method}.json")[method], read_json(root / f"m/{method}.info.json")
        assert info["steps"] >= 3 and math.isfinite(m["val_loss"])
        assert "mfu" not in m and info["peak_flops"] is None  # no MFU on a CPU: no stable peak to divide by
    lora_info = read_json(root / "m/lora.info.json")
    assert lora_info["lora_target_modules"] == AUTO_TARGETS[family]
    for model in ("full", "lora"):
        ev = read_json(root / f"m/evaluate/{model}.json")[model]
        assert math.isfinite(ev["test_ppl"]) and ("test_ppl_lo" in ev) == (ev["test_chunks"] >= 20)
        assert ev.get("test_ppl_lo", 0) <= ev["test_ppl"] <= ev.get("test_ppl_hi", math.inf)
        info = read_json(root / f"m/evaluate/{model}.info.json")
        assert info["protocol"]["model"].endswith("model") and info["protocol"]["bos"] == meta["bos"]
        assert info["scoring"]["path"] == "body + head" and info["scoring"]["checked_max_nll_diff"] < 1e-5


def test_training_lowers_the_loss_and_scoring_equals_the_models_own_logits(family_run):
    family, root = family_run
    val = token_files.load_tokens(root / "prep", "validation")
    pretrained = modeling.load_causal_lm(root / "pre").eval()
    with torch.no_grad():
        before = float(scoring.block_nll(pretrained, val, 32, torch.device("cpu")).mean())
    for method in ("full", "lora"):
        assert read_json(root / f"m/{method}.json")[method]["val_loss"] < before, (family, method)
    # Every test token scored again through the model's own forward (whole logits), window by window.
    for method in ("full", "lora"):
        model = modeling.load_for_eval(root / f"models/{method}", root / "pre", str(root / "model"))
        with torch.no_grad():
            own = scoring.sliding_window_nll(model, token_files.load_tokens(root / "prep", "test"), 32, 16,
                                             torch.device("cpu"), own_forward=True)
        ev = read_json(root / f"m/evaluate/{method}.json")[method]
        assert ev["test_ppl"] == pytest.approx(stats.perplexity(own), rel=1e-5), (family, method)
    assert read_json(root / "gen/lora.json")["prompts"][0]["prompt"] == "The town of"


def test_loras_intruders_are_counted_as_peft_counts_them(family_run):
    """Stage updates' intruder count of each LoRA layer against PEFT's own detector
    (reduce_intruder_dimension, the same top_k and epsilon, its log line per layer). PEFT takes the
    layer's stored weight: for nn.Linear that is out x in, as ours, and the counts agree; GPT-2's
    Conv1D stores in x out, so PEFT's left singular vectors are the input side's: its counts equal
    ours taken on the transposed matrices."""
    from peft.tuners.lora.intruders import reduce_intruder_dimension

    from ftstudy.measure import updates as measure

    family, root = family_run
    info = read_json(root / "m/updates.info.json")
    assert (info["top_k"], info["epsilon"]) == (10, 0.5) and info["layers"]
    model = modeling.load_for_eval(root / "models/lora", root / "pre", str(root / "model"))
    lines = []
    reduce_intruder_dimension(model, top_k=info["top_k"], threshold_epsilon=info["epsilon"], logging_sink=lines.append)
    peft = {}
    for line in lines[:-1]:  # the last: "Enabling new adapter ..."
        name, _, said = line.partition(": ")
        peft[name.removeprefix("base_model.model.")] = 0 if said == "No intruders" else int(said.split(": ")[1])
    ours = {row["name"]: row["lora"]["intruders"] for row in info["layers"]}
    assert set(peft) == set(ours)
    if family != "gpt2":
        assert peft == ours
        return
    pre = modeling.load_causal_lm(root / "pre")
    merged = modeling.load_for_eval(root / "models/lora", root / "pre", str(root / "model")).merge_and_unload()
    stored = {}
    for name in ours:
        w, tuned = measure.as_matrix(pre.get_submodule(name)).T, measure.as_matrix(merged.get_submodule(name)).T
        stored[name] = measure.intruders(measure.left_vectors(w), tuned, info["top_k"], info["epsilon"])
    assert peft == stored
