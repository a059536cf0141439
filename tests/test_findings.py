"""The report's findings follow the metrics, by fixed rules."""

from ftstudy import findings


def _metrics(full_ppl=3.0, lora_ppl=7.0, full_general=15.0, lora_general=4.5, full_rep=0.09):
    def ev(test, general):
        return {"test_ppl": test, "test_ppl_lo": test * 0.95, "test_ppl_hi": test * 1.05,
                "general": {"tiny-general-test": {"ppl": general, "ppl_lo": general * 0.97, "ppl_hi": general * 1.03}}}

    evs = {"pretrained": ev(10.0, 3.7), "full": ev(full_ppl, full_general), "lora": ev(lora_ppl, lora_general)}
    tr = {m: {"trainable_params": n, "tokens_per_s": t, "peak_mem_gib": 1.0, "peak_mem_kind": "cpu_peak_rss",
              "artifact_mb": a, "train_s": 10.0, "device": "cpu (x86_64, 2 threads)", "precision": "fp32", "processes": 1, "val_loss_best": best, "val_best_step": 100, "val_rise_after_best": rise}
          for m, n, t, a, best, rise in (("full", 170_000, 20_000, 0.7, 1.1, 0.0), ("lora", 4096, 25_000, 0.07, 1.9, 0.0))}
    gq = {m: {"repetition_4gram": r, "distinct_2": 0.5} for m, r in (("pretrained", 0.01), ("full", full_rep), ("lora", 0.13))}
    paired = {f"{a}_vs_{b}": paired_ratio(evs[a]["test_ppl"] / evs[b]["test_ppl"])
              for a, b in (("full", "pretrained"), ("lora", "pretrained"), ("full", "lora"))}
    return evs, tr, gq, paired, REACH


REACH = {"full": {"target": 1.9, "seconds": 2.5, "tokens": 20480, "step": 20}, "lora": {"target": 1.1}}


def paired_ratio(ratio: float, half_width: float = 0.02) -> dict:
    return {"ratio": ratio, "lo": ratio - half_width, "hi": ratio + half_width}


def test_findings_follow_the_metrics():
    base = findings.findings(*_metrics())
    assert base[0].startswith("Full fine-tuning gives the lowest test perplexity, 3.00")
    assert base[1] == ("Full fine-tuning has a lower test perplexity than the pretrained model by 70.0%, "
                       "ratio 0.300 (95% paired CI 0.280–0.320).")
    rest = base[4:]
    assert "+305.4% after full fine-tuning and +21.6% after LoRA" in rest[0]
    assert "LoRA retains more" in rest[0]
    assert "did not come with the most repetitive text" in rest[1]

    swapped = findings.findings(*_metrics(full_ppl=7.0, lora_ppl=3.0, full_general=3.8, lora_general=9.0))
    assert swapped[0].startswith("LoRA gives the lowest test perplexity, 3.00")
    assert "Full fine-tuning has a higher test perplexity than LoRA" in swapped[3]
    assert "full fine-tuning retains more" in swapped[4]

    close = findings.findings(*_metrics(full_ppl=7.0, lora_ppl=7.1))  # ratio 0.986 +- 0.02: includes 1
    assert "Full fine-tuning vs LoRA: a tie on test perplexity, ratio 0.986 (95% paired CI 0.966–1.006)" in " ".join(close)
    # The same two models, tighter paired interval: now a winner, though their separate
    # intervals (+-5%) overlap.
    evs, tr, gq, paired, reach = _metrics(full_ppl=7.0, lora_ppl=7.1)
    paired["full_vs_lora"] = paired_ratio(7.0 / 7.1, half_width=0.005)
    decided = " ".join(findings.findings(evs, tr, gq, paired, reach))
    assert "Full fine-tuning has a lower test perplexity than LoRA by 1.4%, ratio 0.986" in decided
    assert "LoRA has a lower test perplexity than the pretrained model by 29.0%" in decided

    no_forgetting = findings.findings(*_metrics(full_general=3.75, lora_general=3.72))
    assert "no measurable forgetting" in no_forgetting[4]

    repetitive = findings.findings(*_metrics(full_rep=0.5))
    assert "came with the most repetitive text" in repetitive[5]


def test_training_findings_give_time_to_quality_and_overfitting():
    evs, tr, gq, paired, reach = _metrics()
    text = " ".join(findings.findings(evs, tr, gq, paired, reach))
    assert "Full fine-tuning reached LoRA's final validation loss (1.9000) after 2.5 s of training and 20,480 tokens (25% of its run)." in text
    assert "LoRA never reached full fine-tuning's final validation loss (1.1000); its best was 1.9000." in text
    assert "no sign of overfitting" in text
    tr["full"]["val_rise_after_best"] = 0.05
    text = " ".join(findings.findings(evs, tr, gq, paired, reach))
    assert "Validation loss rose after its minimum for full fine-tuning (+0.0500 after step 100)" in text


def test_speeds_are_compared_only_like_with_like():
    evs, tr, gq, paired, reach = _metrics()
    same = findings.findings(evs, tr, gq, paired, reach)[-1]
    assert same.endswith("both trained on cpu (x86_64, 2 threads), fp32, 1 process(es), it ran at 1.25x full "
                         "fine-tuning's tokens/s with 1.00x its peak memory (cpu peak rss).")
    tr["lora"]["device"] = "cpu (x86_64, 1 threads)"
    other = findings.findings(evs, tr, gq, paired, reach)[-1]
    assert "x full fine-tuning's tokens/s" not in other
    assert other.endswith("not compared, since they trained on different setups (full fine-tuning: cpu (x86_64, "
                          "2 threads), fp32, 1 process(es); LoRA: cpu (x86_64, 1 threads), fp32, 1 process(es)).")
