"""Issue-4 measurements: intervals, bits per byte, generation quality, LoRA merge check, findings."""

import copy
import math

import numpy as np
import pytest
import torch

from conftest import TINY_MODEL, TINY_WIKI, demo_params, run_main
from stages import data, evaluate, findings, generate, modeling, prepare, scoring, train_lora
from stages.config import load_params, parse_params


def test_bootstrap_interval_contains_the_estimate_and_shrinks_with_more_data():
    rng = np.random.default_rng(0)
    small = rng.gamma(2.0, 1.0, size=2_000)
    large = rng.gamma(2.0, 1.0, size=50_000)
    widths = []
    for nll in (small, large):
        lo, hi = scoring.bootstrap_ppl_interval(nll, chunk=100, samples=1000, seed=1)
        assert lo < scoring.perplexity(nll) < hi
        widths.append(hi - lo)
    assert widths[1] < widths[0] / 3  # ~ 1/sqrt(25) of the width
    assert scoring.bootstrap_ppl_interval(small, 100, 1000, 1) == scoring.bootstrap_ppl_interval(small, 100, 1000, 1)


def test_bits_per_byte_equals_total_nll_over_bytes_computed_independently(project):
    project(**{"evaluate.stride": 32})
    run_main(prepare, "--out", "prep", "--pretrained", "pre", "--metrics", "m.json")
    p = load_params()
    model = modeling.load_causal_lm(TINY_MODEL).eval()
    n_bytes = data.read_meta("prep")["splits"]["test"]["bytes"]
    got = evaluate.sliding_metrics(model, data.load_tokens("prep", "test"), n_bytes, p, torch.device("cpu"), "test")

    # Independently: tokenize the raw file, let the HF model's own loss score each window's new
    # targets (labels -100 elsewhere), and count the file's UTF-8 bytes.
    text = (TINY_WIKI / "wiki.test.raw").read_text(encoding="utf-8")
    tok = modeling.load_tokenizer(TINY_MODEL)
    ids = torch.tensor([i for row in tok(text.splitlines(keepends=True), add_special_tokens=False)["input_ids"] for i in row])
    total = count = 0.0
    for begin, end, first in scoring.window_plan(len(ids), 128, 32):
        x = ids[begin:end][None]
        labels = x.clone()
        labels[:, : first - begin] = -100
        with torch.no_grad():
            loss = model(input_ids=x, labels=labels).loss.item()
        n = end - first
        total, count = total + loss * n, count + n
    assert got["tokens"] == count == len(ids) - 1
    assert got["bpb"] == pytest.approx(total / (math.log(2) * len(text.encode("utf-8"))), rel=1e-5)
    assert got["ppl"] == pytest.approx(math.exp(total / count), rel=1e-5)
    assert got["ppl_lo"] < got["ppl"] < got["ppl_hi"]


def test_text_quality_metrics():
    eos = 0
    q = generate.text_quality([[5, 6, 7, 8, 5, 6, 7, 8, 9], [1, 2, 3, eos, 4, 4]], eos)
    # The second text stops at EOS after 3 tokens; what follows EOS does not count.
    assert q["mean_length"] == (9 + 3) / 2 and q["eos_rate"] == 0.5
    assert q["distinct_1"] == pytest.approx(8 / 12)          # {5,6,7,8,9,1,2,3} over 12 tokens
    assert q["distinct_2"] == pytest.approx(7 / 10)          # {56 67 78 85 89 12 23} of 8 + 2 bigrams
    assert q["repetition_4gram"] == pytest.approx(1 / 6)     # 5678 comes back once among 6 4-grams
    assert generate.text_quality([], eos)["texts"] == 0


@pytest.fixture
def lora_model():
    p = parse_params(demo_params(**{"lora.target_modules": ["c_proj"], "lora.dropout": 0.0}))
    model = modeling.wrap_lora(modeling.load_causal_lm(TINY_MODEL), p.lora, str(TINY_MODEL))
    torch.manual_seed(0)
    for name, param in model.named_parameters():
        if "lora_B" in name:  # as after training: a non-zero update
            param.data.normal_(0, 0.2)
    return model, torch.randint(0, 1000, (2, 32))


def test_merge_check_passes_for_a_sound_adapter(lora_model):
    model, batch = lora_model
    model.eval()
    diff, merged = train_lora.merge_check(model, batch)
    assert diff < 1e-4
    assert torch.allclose(merged(input_ids=batch).logits, model(input_ids=batch).logits, atol=1e-4)


def test_merge_check_fails_on_a_corrupted_adapter(lora_model):
    model, batch = lora_model
    broken = copy.deepcopy(model)
    for module in broken.modules():  # a layout flag lost: GPT-2's Conv1D treated as nn.Linear
        if hasattr(module, "fan_in_fan_out"):
            module.fan_in_fan_out = False
    with pytest.raises(modeling.ModelError, match="LoRA merge check failed"):
        train_lora.merge_check(broken, batch)
    nan = copy.deepcopy(model)
    next(p for n, p in nan.named_parameters() if "lora_A" in n).data[0, 0] = float("nan")
    with pytest.raises(modeling.ModelError, match="LoRA merge check failed: merged and base\\+adapter logits differ by nan"):
        train_lora.merge_check(nan, batch)


def _metrics(full_ppl=3.0, lora_ppl=7.0, full_general=15.0, lora_general=4.5, full_rep=0.09):
    def ev(test, general):
        return {"test_ppl": test, "test_ppl_lo": test * 0.95, "test_ppl_hi": test * 1.05,
                "general": {"tiny-general-test": {"ppl": general, "ppl_lo": general * 0.97, "ppl_hi": general * 1.03}}}

    evs = {"pretrained": ev(10.0, 3.7), "full": ev(full_ppl, full_general), "lora": ev(lora_ppl, lora_general)}
    tr = {m: {"trainable_params": n, "tokens_per_s": t, "peak_mem_gib": 1.0, "peak_mem_kind": "cpu_peak_rss",
              "artifact_mb": a} for m, n, t, a in (("full", 170_000, 20_000, 0.7), ("lora", 4096, 25_000, 0.07))}
    gq = {m: {"repetition_4gram": r, "distinct_2": 0.5} for m, r in (("pretrained", 0.01), ("full", full_rep), ("lora", 0.13))}
    return evs, tr, gq


def test_findings_follow_the_metrics():
    base = findings.findings(*_metrics())
    assert base[0].startswith("Full fine-tuning gives the lowest WikiText test perplexity, 3.00")
    assert "+305.4% after full fine-tuning and +21.6% after LoRA" in base[1]
    assert "LoRA retains more" in base[1]
    assert "did not come with the most repetitive text" in base[2]

    swapped = findings.findings(*_metrics(full_ppl=7.0, lora_ppl=3.0, full_general=3.8, lora_general=9.0))
    assert swapped[0].startswith("LoRA gives the lowest WikiText test perplexity, 3.00")
    assert "full fine-tuning retains more" in swapped[1]

    tie = findings.findings(*_metrics(full_ppl=7.0, lora_ppl=7.2))
    assert "LoRA: a tie; their intervals overlap" in " ".join(tie)

    no_forgetting = findings.findings(*_metrics(full_general=3.75, lora_general=3.72))
    assert "no measurable forgetting" in no_forgetting[1]

    repetitive = findings.findings(*_metrics(full_rep=0.5))
    assert "came with the most repetitive text" in repetitive[2]
