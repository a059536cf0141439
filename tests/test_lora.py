"""LoRA and its variants through real PEFT: target matching, names, refusals, and the integrity check on
sound and corrupted adapters."""

import copy
import json
import math
from pathlib import Path

import pytest
import torch

from conftest import TINY_MODEL, demo_params
from ftstudy import modeling
from ftstudy.config import ConfigError, parse_params
from ftstudy.train import lora


def test_lora_target_that_matches_nothing_lists_valid_names():
    model = modeling.load_causal_lm(TINY_MODEL)
    params = parse_params(demo_params(**{"lora.target_modules": ["c_attn", "q_proj"]})).lora
    with pytest.raises(modeling.ModelError, match=r"lora.target_modules: 'q_proj' matches no layer of this model; "
                                                  r"valid names: c_attn, c_fc, c_proj, lm_head. Set them with "
                                                  r"-S 'lora.target_modules=\[c_attn\]', or use auto"):
        lora.wrap(model, params, "x")


def test_auto_and_all_linear_resolve_to_layer_names():
    model = modeling.load_causal_lm(TINY_MODEL)
    assert lora.resolve_targets(model, "auto") == ["c_attn"]  # PEFT's GPT-2 default
    assert lora.resolve_targets(model, "all-linear") == ["c_attn", "c_fc", "c_proj"]  # not the output layer


def test_expected_count_for_gpt2_at_r8_every_linear_layer_by_default():
    from transformers import GPT2Config

    with torch.device("meta"):
        from transformers import GPT2LMHeadModel

        skeleton = GPT2LMHeadModel(GPT2Config())
    params = parse_params(demo_params()).lora
    assert params.r == 8 and lora.resolve_targets(skeleton, params.target_modules) == ["c_attn", "c_fc", "c_proj"]
    # Per layer: c_attn 8 x (768 + 2304), attention's c_proj 8 x (768 + 768), the MLP's c_fc and c_proj 8 x (768 + 3072) each.
    assert lora.expected_params(skeleton, params, ["c_attn", "c_fc", "c_proj"]) == 12 * 8 * (3072 + 1536 + 2 * 3840)
    assert lora.expected_params(skeleton, params, ["c_attn"]) == 294_912  # 12 layers x 8 x (768 + 2304)
    dora = parse_params(demo_params(**{"lora.use_dora": True})).lora
    assert lora.expected_params(skeleton, dora, ["c_attn"]) == 294_912 + 12 * 2304  # a magnitude per output


@pytest.mark.parametrize("overrides,name", [
    ({}, "LoRA"), ({"lora.use_dora": True}, "DoRA"), ({"lora.use_rslora": True}, "rsLoRA"),
    ({"lora.quantize": "nf4"}, "QLoRA"), ({"lora.init_lora_weights": "pissa"}, "LoRA (PiSSA init)"),
    ({"lora.use_dora": True, "lora.quantize": "nf4"}, "DoRA on a 4-bit base"),
    ({"lora.init_lora_weights": "olora"}, "LoRA (OLoRA init)")])
def test_variants_are_named_as_the_literature_names_them(overrides, name):
    assert lora.variant(parse_params(demo_params(**overrides)).lora) == name


@pytest.mark.parametrize("value", ["eva", "corda", "loftq", "pisa", "pissa_niter_0"])
def test_an_init_this_study_cannot_run_is_refused_naming_the_key(value):
    with pytest.raises(ConfigError, match=r"lora.init_lora_weights: must be true, false, gaussian, orthogonal, pissa, "
                                          r"pissa_niter_<n> or olora"):
        parse_params(demo_params(**{"lora.init_lora_weights": value}))


def test_olora_on_gpt2s_conv1d_is_refused_before_any_weight_loads():
    p = parse_params(demo_params(**{"lora.init_lora_weights": "olora"}))
    with pytest.raises(ConfigError, match=r"^lora.init_lora_weights: olora builds its factors for nn.Linear layers"):
        lora.plan(TINY_MODEL, p.lora)


@pytest.fixture
def saved(tmp_path):
    """A trained-looking adapter (non-zero B), its saved folder, a batch and its reference NLL."""
    p = parse_params(demo_params(**{"lora.target_modules": ["c_proj"], "lora.dropout": 0.0}))
    model = lora.wrap(modeling.load_causal_lm(TINY_MODEL), p.lora, str(TINY_MODEL))
    torch.manual_seed(0)
    for name, param in model.named_parameters():
        if "lora_B" in name:  # as after training: a non-zero update
            param.data.normal_(0, 0.2)
    lora.save(model, tmp_path / "adapter", p.lora, None)
    batch = {"input_ids": torch.randint(0, 1000, (2, 32))}
    return model.eval(), tmp_path / "adapter", p.lora, batch


def test_the_integrity_check_passes_a_sound_adapter(saved):
    model, folder, params, batch = saved
    diffs, merged = lora.check(folder, TINY_MODEL, params, "fp32", batch, lora.nll(model, batch))
    assert diffs["reload_max_abs_diff"] < 1e-5 and diffs["merge_max_abs_diff"] < 1e-4
    assert torch.allclose(merged(**batch).logits, model(**batch).logits, atol=1e-4)


def test_the_integrity_check_fails_a_wrongly_saved_or_corrupt_adapter(saved):
    model, folder, params, batch = saved
    drifted = copy.deepcopy(model)  # trained on after it was saved: the folder is not this model
    next(p for n, p in drifted.named_parameters() if "lora_B" in n).data += torch.randn(64, 8)  # (a constant would vanish in LayerNorm)
    with pytest.raises(modeling.ModelError, match=r"LoRA integrity check failed: the saved adapter on a fresh base and "
                                                  r"the trained model score the same tokens"):
        lora.check(folder, TINY_MODEL, params, "fp32", batch, lora.nll(drifted, batch))
    from safetensors.torch import load_file, save_file

    weights = load_file(folder / "adapter_model.safetensors")  # the saved file damaged: one factor doubled
    key = next(k for k in weights if "lora_A" in k)
    save_file(weights | {key: 2 * weights[key]}, folder / "adapter_model.safetensors")
    with pytest.raises(modeling.ModelError, match=r"LoRA integrity check failed: the saved adapter"):
        lora.check(folder, TINY_MODEL, params, "fp32", batch, lora.nll(model, batch))
    nan = copy.deepcopy(model)
    next(p for n, p in nan.named_parameters() if "lora_A" in n).data[0, 0] = float("nan")
    with pytest.raises(modeling.ModelError, match=r"score the same tokens nan nats apart"):
        lora.check(folder, TINY_MODEL, params, "fp32", batch, lora.nll(nan, batch))


VARIANTS = [({"lora.use_dora": True}, "gpt2"), ({"lora.use_rslora": True}, "gpt2"),
            ({"lora.init_lora_weights": "pissa"}, "gpt2"), ({"lora.init_lora_weights": "olora"}, "llama"),
            ({"lora.quantize": "nf4"}, "gpt2"), ({"model.dtype": "bf16"}, "gpt2")]


@pytest.mark.parametrize("overrides,family", VARIANTS, ids=[next(iter(o)) + f"={next(iter(o.values()))}" for o, _ in VARIANTS])
def test_every_variant_trains_through_the_stage_with_a_sound_adapter(project, tmp_path, overrides, family):
    """train_lora on each variant: the trainable count checked, the saved adapter (PiSSA and OLoRA
    converted to plain LoRA) reloads on a fresh base to the trained model's logits, and evaluate
    scores it as base plus adapter."""
    from conftest import prepare_in, reset_accelerate, run_main, train_args
    from ftstudy.outputs import read_json
    from ftstudy.synthetic import write_tiny_model
    from stages import evaluate, train_lora, updates

    model = TINY_MODEL if family == "gpt2" else write_tiny_model(family, tmp_path / family)
    prepare_in(project, **{"model.name": str(model), "train.epochs": 1, "lora.dropout": 0.0} | overrides)
    run_main(train_lora, *train_args("lora"))
    reset_accelerate()
    m, info = read_json("m/lora.json")["lora"], read_json("m/lora.info.json")
    p = parse_params(demo_params(**overrides)).lora
    assert info["variant"] == lora.variant(p) and m["reload_max_abs_diff"] <= m["check_tolerance"]
    assert ("merge_max_abs_diff" in m) == (p.quantize != "nf4")
    assert info["base_dtype"] == overrides.get("model.dtype", "fp32")
    config = json.loads((tmp_path / "models/lora/adapter_config.json").read_text())
    assert config["use_dora"] is p.use_dora and config["use_rslora"] is p.use_rslora
    if lora.reshapes_base(p):  # saved as plain LoRA of twice the rank on the original base
        assert config["init_lora_weights"] is True and config["r"] == 2 * p.r
    run_main(evaluate, "--model", "models/lora", "--base", "pre", "--data", "prep", "--out", "m/evaluate/lora.json",
             "--info", "m/evaluate/lora.info.json", "--nll", "nll/lora.npz")
    assert math.isfinite(read_json("m/evaluate/lora.json")["lora"]["test_ppl"])
    # Stage updates reports the update's measured rank, not the configured one: r for LoRA, rsLoRA and
    # QLoRA, 2r for the converted PiSSA and OLoRA adapters, more for DoRA (its magnitude rescales whole
    # columns); a 4-bit base is the one measured against. (The pretrained snapshot stands in for full.)
    run_main(updates, "--base", "pre", "--full", "pre", "--lora", "models/lora", "--out", "m/updates.json",
             "--info", "m/updates.info.json", "--values", "updates.npz")
    u, u_info = read_json("m/updates.json")["updates"], read_json("m/updates.info.json")
    ranks = {row["lora"]["rank"] for row in u_info["layers"]}
    if p.use_dora:
        assert min(ranks) > p.r
    else:
        assert ranks == {2 * p.r if lora.reshapes_base(p) else p.r}
    assert ("4-bit" in u_info["lora_base"]) == (p.quantize == "nf4") and u_info["lora_variant"] == lora.variant(p)
    assert (u["full"]["rank"], u["full"]["intruders"], u["full"]["relative_norm"]) == (0, 0, 0)


@pytest.mark.early
def test_a_stage_process_without_nf4_leaves_bitsandbytes_out(project):
    """PEFT imports bitsandbytes whenever it is installed (seconds of every adapter stage's start);
    a stage's own process that needs no 4-bit keeps it out, and the adapter still loads and scores.
    In any other process (this test's) the call changes nothing, so an nf4 run there still works."""
    import os
    import subprocess
    import sys

    from conftest import ROOT, prepare_in, reset_accelerate, run_main, train_args
    from ftstudy.outputs import read_json
    from stages import train_lora

    prepare_in(project, **{"train.epochs": 1})
    run_main(train_lora, *train_args("lora"))
    reset_accelerate()
    before = sys.modules.get("bitsandbytes", "absent")
    modeling.leave_out_bitsandbytes("pre")
    assert sys.modules.get("bitsandbytes", "absent") is before
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "stages.evaluate", "--model", "models/lora",
                           "--base", "pre", "--data", "prep", "--out", "m/evaluate/lora.json", "--info",
                           "m/evaluate/lora.info.json", "--nll", "nll/lora.npz"],
                          capture_output=True, text=True, env=os.environ | {"PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    # "bitsandbytes" itself is listed (its None entry, looked up in no time), none of its modules
    assert "peft" in imported and not {m for m in imported if m.startswith("bitsandbytes.")}
    assert math.isfinite(read_json("m/evaluate/lora.json")["lora"]["test_ppl"])


@pytest.fixture
def avx512_bf16(monkeypatch):
    """bitsandbytes' Linear4bit as it is built on a CPU with AVX512-BF16: it then repacks its weights
    for an inference kernel at its first forward in eval mode without gradients (a pure-torch
    repack, so it runs on any CPU)."""
    import bitsandbytes

    monkeypatch.setattr(bitsandbytes.nn.modules, "has_avx512bf16", lambda: True)
    assert bitsandbytes.nn.Linear4bit(64, 64).support_avx512bf16_for_cpu  # the emulation reaches the layer


def test_qlora_trains_validates_and_checks_on_a_cpu_with_avx512_bf16(project, avx512_bf16):
    """Validation during 4-bit training (every 5 steps) and the fast-path check before it: on such
    a CPU the repack for inference used to stick, and the following steps ran through a kernel
    with no backward (a RuntimeError there; here, silently wrong training that the reload check
    caught 0.4 nats apart)."""
    from conftest import prepare_in, run_main, train_args
    from ftstudy.outputs import read_json
    from stages import train_lora

    prepare_in(project, **{"lora.quantize": "nf4", "train.epochs": 1, "train.eval_every": 5, "lora.dropout": 0.0})
    run_main(train_lora, *train_args("lora"))
    m, info = read_json("m/lora.json")["lora"], read_json("m/lora.info.json")
    assert info["variant"] == "QLoRA" and m["reload_max_abs_diff"] <= m["check_tolerance"]
    assert m["val_loss"] < 5.0  # it learned: the pretrained tiny model starts near 5.8


def test_a_failure_in_the_4bit_path_ends_the_stage_in_one_line(project, monkeypatch, capsys):
    import bitsandbytes

    from conftest import prepare_in
    from ftstudy.errors import run_stage
    from stages import train_lora

    prepare_in(project, **{"lora.quantize": "nf4", "train.epochs": 1})

    def broken_kernel(*args, **kwargs):
        raise RuntimeError("no kernel image is available for execution on the device\nsecond line")

    monkeypatch.setattr(bitsandbytes, "matmul_4bit", broken_kernel)  # what Linear4bit.forward calls
    monkeypatch.setattr("sys.argv", ["train_lora.py", *__import__("conftest").train_args("lora")])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        run_stage(train_lora.main)
    assert exit_.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    error = next(line for line in err if "error:" in line)
    assert error.startswith("train_lora: error: lora.quantize: nf4: the 4-bit path failed in bitsandbytes ")
    assert "(RuntimeError: no kernel image is available for execution on the device); " in error
    assert "-S lora.quantize=none" in error and "Traceback" not in "\n".join(err)


def test_an_error_outside_bitsandbytes_is_not_blamed_on_the_4bit_path():
    params = parse_params(demo_params(**{"lora.quantize": "nf4"})).lora
    with pytest.raises(KeyError), lora.quantized_path_errors(params):
        raise KeyError("ours")


def test_bitsandbytes_note_about_the_kernels_hub_is_not_shown(caplog):
    import logging

    import ftstudy  # noqa: F401  (installs the filter)

    log = logging.getLogger("bitsandbytes.backends.cpu.ops")
    with caplog.at_level(logging.WARNING):
        log.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure you "
                    "already `pip install kernels` and the kernels >= 0.11.1", "No module named 'kernels'")
        log.warning("another bitsandbytes warning")
    assert [r.getMessage() for r in caplog.records] == ["another bitsandbytes warning"]


TARGETS = ("c_attn", "c_fc", "c_proj")  # GPT-2's, which PEFT keeps as a set


def save_adapter(out: Path) -> None:
    """The demo's LoRA adapter on the tiny GPT-2, untrained, saved to `out` by lora.save."""
    p = parse_params(demo_params()).lora
    lora.save(lora.wrap(modeling.load_causal_lm(TINY_MODEL), p, str(TINY_MODEL)), out, p, None)


@pytest.mark.early
def test_the_saved_adapter_config_is_the_same_bytes_whatever_the_hash_seed(tmp_path):
    """PEFT saves target_modules in a set's order, which Python's string hashing changes from run to
    run (PYTHONHASHSEED): two identical trainings once saved different adapter folders. This
    process saves one, a fresh interpreter under a seed that orders the names otherwise the other."""
    import os
    import subprocess
    import sys

    from conftest import ROOT

    env = os.environ | {"PYTHONPATH": str(ROOT)}
    # Seeds 1 and 2 order these names' set differently from each other, so one differs from this process.
    orders = {s: subprocess.run([sys.executable, "-c", f"print(list(set({TARGETS!r})))"], check=True,
                                capture_output=True, text=True, env=env | {"PYTHONHASHSEED": s}).stdout.strip()
              for s in ("1", "2")}
    assert len(set(orders.values())) == 2
    seed = next(s for s, order in orders.items() if order != str(list(set(TARGETS))))
    save_adapter(tmp_path / "here")
    # bitsandbytes kept out, as a stage's own process keeps it (modeling.leave_out_bitsandbytes), and
    # the end a stage's process has (gc.freeze: ftstudy.errors.run_stage).
    code = ("import sys; sys.modules['bitsandbytes'] = None; from pathlib import Path; "
            "from test_lora import save_adapter; save_adapter(Path(sys.argv[1])); import gc; gc.freeze()")
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "there")], cwd=ROOT / "tests", check=True,
                   capture_output=True, env=env | {"PYTHONHASHSEED": seed})
    configs = [(tmp_path / where / "adapter_config.json").read_bytes() for where in ("here", "there")]
    assert configs[0] == configs[1]
    assert json.loads(configs[0])["target_modules"] == ["c_attn", "c_fc", "c_proj"]
