"""The report's findings follow the metrics, by fixed rules."""

from gpt2study import findings


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
