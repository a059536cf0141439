"""Model folders: missing files, corrupt weights, an adapter on the wrong base."""

import json

import pytest

from conftest import prepare_in, run_main, train_args
from ftstudy import modeling
from ftstudy.config import load_params
from stages import train_lora


@pytest.fixture
def prepared(project):
    return prepare_in(project, **{"train.epochs": 1})


def test_model_folder_without_config_or_weights(tmp_path):
    with pytest.raises(modeling.ModelError, match="no config.json; this is not a save_pretrained folder"):
        modeling.load_causal_lm(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(modeling.ModelError, match=r"no weights \(\*.safetensors\); the folder is incomplete"):
        modeling.load_causal_lm(tmp_path)
    with pytest.raises(modeling.ModelError, match="not a directory"):
        modeling.load_causal_lm(tmp_path / "missing")


def test_truncated_safetensors_is_named(prepared):
    weights = prepared / "pre" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(modeling.ModelError, match=r"pre/model.safetensors: truncated or corrupt"):
        modeling.load_causal_lm(prepared / "pre")


def test_adapter_trained_on_another_base_is_refused(prepared):
    run_main(train_lora, *train_args("lora"))
    p = load_params()
    model = modeling.load_for_eval(prepared / "models/lora", prepared / "pre", p.model.name)
    assert type(model).__name__ == "PeftModelForCausalLM" and not model.training
    with pytest.raises(modeling.ModelError, match=r"adapter was trained on base '.*tiny-gpt2', but model.name is 'gpt2'; retrain it"):
        modeling.load_for_eval(prepared / "models/lora", prepared / "pre", "gpt2")
    cfg = json.loads((prepared / "models/lora/adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == p.model.name
