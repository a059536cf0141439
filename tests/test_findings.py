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
    paired = {f"{a}_vs_{b}": paired_ratio(evs[a]["test_ppl"] / evs[b]["test_ppl"])
              for a, b in (("full", "pretrained"), ("lora", "pretrained"), ("full", "lora"))}
    return evs, tr, gq, paired


def paired_ratio(ratio: float, half_width: float = 0.02) -> dict:
    return {"ratio": ratio, "lo": ratio - half_width, "hi": ratio + half_width}


def test_findings_follow_the_metrics():
    base = findings.findings(*_metrics())
    assert base[0].startswith("Full fine-tuning gives the lowest WikiText test perplexity, 3.00")
    assert base[1] == ("Full fine-tuning has a lower test perplexity than the pretrained model by 70.0%, "
                       "ratio 0.300 (95% paired CI 0.280–0.320).")
    rest = base[4:]
    assert "+305.4% after full fine-tuning and +21.6% after LoRA" in rest[0]
    assert "LoRA retains more" in rest[0]
    assert "did not come with the most repetitive text" in rest[1]

    swapped = findings.findings(*_metrics(full_ppl=7.0, lora_ppl=3.0, full_general=3.8, lora_general=9.0))
    assert swapped[0].startswith("LoRA gives the lowest WikiText test perplexity, 3.00")
    assert "Full fine-tuning has a higher test perplexity than LoRA" in swapped[3]
    assert "full fine-tuning retains more" in swapped[4]

    close = findings.findings(*_metrics(full_ppl=7.0, lora_ppl=7.1))  # ratio 0.986 +- 0.02: includes 1
    assert "Full fine-tuning vs LoRA: a tie on test perplexity, ratio 0.986 (95% paired CI 0.966–1.006)" in " ".join(close)
    # The same two models, tighter paired interval: now a winner, though their separate
    # intervals (+-5%) overlap.
    evs, tr, gq, paired = _metrics(full_ppl=7.0, lora_ppl=7.1)
    paired["full_vs_lora"] = paired_ratio(7.0 / 7.1, half_width=0.005)
    decided = " ".join(findings.findings(evs, tr, gq, paired))
    assert "Full fine-tuning has a lower test perplexity than LoRA by 1.4%, ratio 0.986" in decided
    assert "LoRA has a lower test perplexity than the pretrained model by 29.0%" in decided

    no_forgetting = findings.findings(*_metrics(full_general=3.75, lora_general=3.72))
    assert "no measurable forgetting" in no_forgetting[4]

    repetitive = findings.findings(*_metrics(full_rep=0.5))
    assert "came with the most repetitive text" in repetitive[5]
