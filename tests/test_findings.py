"""The report's findings follow the metrics, by fixed rules."""

import re

from ftstudy.report import findings

PAIRS = (("full", "pretrained"), ("lora", "pretrained"), ("full", "lora"))
BOOTSTRAP = {"chunk": 1024, "min_chunks": 20}


def _metrics(full_ppl=3.0, lora_ppl=7.0, full_general=15.0, lora_general=4.5, full_rep=0.09, half_width=0.02,
             full_len=40.0):
    def ev(test, general):
        return {"test_ppl": test, "test_ppl_lo": test * 0.95, "test_ppl_hi": test * 1.05,
                "general": {"tiny-general-test": {"ppl": general, "ppl_lo": general * 0.97, "ppl_hi": general * 1.03}}}

    evs = {"pretrained": ev(10.0, 3.7), "full": ev(full_ppl, full_general), "lora": ev(lora_ppl, lora_general)}
    tr = {m: {"trainable_params": n, "tokens_per_s": t, "peak_mem_gib": 1.0, "peak_mem_kind": "cpu_peak_rss",
              "artifact_mb": a, "train_s": 10.0, "device": "cpu (x86_64, 2 threads)", "precision": "fp32", "processes": 1, "val_loss_best": best, "val_best_step": 100, "val_rise_after_best": rise}
          for m, n, t, a, best, rise in (("full", 170_000, 20_000, 0.7, 1.1, 0.0), ("lora", 4096, 25_000, 0.07, 1.9, 0.0))}
    gq = {m: {"repetition_4gram": r, "distinct_2": 0.5, "mean_length": n}
          for m, r, n in (("pretrained", 0.01, 40.0), ("full", full_rep, full_len), ("lora", 0.13, 38.0))}
    paired = {f"{a}_vs_{b}": paired_ratio(evs[a]["test_ppl"] / evs[b]["test_ppl"]) for a, b in PAIRS}
    general = {m: evs[m]["general"]["tiny-general-test"]["ppl"] for m in evs}
    forgetting = {"tiny-general-test": {f"{a}_vs_{b}": paired_ratio(general[a] / general[b], half_width)
                                        for a, b in PAIRS}}
    compare = {"paired": paired, "forgetting": forgetting, "time_to_quality": REACH, "bootstrap": BOOTSTRAP}
    return evs, tr, gq, compare


REACH = {"full": {"target": 1.9, "seconds": 2.5, "tokens": 20480, "step": 20}, "lora": {"target": 1.1}}


def paired_ratio(ratio: float, half_width: float = 0.02, chunks: int = 50) -> dict:
    return {"ratio": ratio, "lo": ratio - half_width, "hi": ratio + half_width, "chunks": chunks}


def test_findings_follow_the_metrics():
    base = findings.findings(*_metrics())
    assert base[0].startswith("Full fine-tuning gives the lowest test perplexity, 3.00")
    assert base[1] == ("Full fine-tuning has a lower test perplexity than the pretrained model by 70.0%, "
                       "ratio 0.300 (95% paired CI 0.280–0.320).")
    rest = base[4:]
    assert "did not come with the most repetitive text" in rest[1]

    swapped = findings.findings(*_metrics(full_ppl=7.0, lora_ppl=3.0, full_general=3.8, lora_general=9.0))
    assert swapped[0].startswith("LoRA gives the lowest test perplexity, 3.00")
    assert "Full fine-tuning has a higher test perplexity than LoRA" in swapped[3]
    assert "full fine-tuning retains more" in swapped[4]

    close = findings.findings(*_metrics(full_ppl=7.0, lora_ppl=7.1))  # ratio 0.986 +- 0.02: includes 1
    assert "Full fine-tuning vs LoRA: a tie on test perplexity, ratio 0.986 (95% paired CI 0.966–1.006)" in " ".join(close)
    # The same two models, tighter paired interval: now a winner, though their separate
    # intervals (+-5%) overlap.
    evs, tr, gq, compare = _metrics(full_ppl=7.0, lora_ppl=7.1)
    compare["paired"]["full_vs_lora"] = paired_ratio(7.0 / 7.1, half_width=0.005)
    decided = " ".join(findings.findings(evs, tr, gq, compare))
    assert "Full fine-tuning has a lower test perplexity than LoRA by 1.4%, ratio 0.986" in decided
    assert "LoRA has a lower test perplexity than the pretrained model by 29.0%" in decided

    no_forgetting = findings.findings(*_metrics(full_general=3.75, lora_general=3.72))
    assert "no measurable forgetting" in no_forgetting[4]
    assert "neither paired interval lies wholly above +0%" in no_forgetting[4]  # in the terms printed: a percentage
    # Forgetting is called from the paired interval of each method against the pretrained model,
    # and which method kept more from the paired interval between them.
    # A change of a factor of 2 or more reads as the factor (once "+95952.0%"), a smaller one in percent.
    assert ("4.05x (95% paired CI 4.03x to 4.07x) after full fine-tuning and +21.6% (95% paired CI +19.6% to "
            "+23.6%) after LoRA") in rest[0]
    assert findings.change({"ratio": 0.99996, "lo": 0.9999, "hi": 1.0001}) == "+0.0% (95% paired CI +0.0% to +0.0%)"
    assert findings.change({"ratio": 960.52}) == "960.5x"
    assert ("LoRA retains more of the pretrained model's general ability (full fine-tuning over LoRA: ratio 3.333 "
            "(95% paired CI 3.313–3.353))") in rest[0]
    both = findings.findings(*_metrics(full_general=3.9, lora_general=3.89, half_width=0.01))
    assert "which method retains more is within the paired interval" in both[4]


    repetitive = findings.findings(*_metrics(full_rep=0.5))
    assert "came with the most repetitive text" in repetitive[5]
    assert "over texts of 40 tokens on average (vs the pretrained model 40, LoRA 38)" in repetitive[5]
    assert "not like for like" not in repetitive[5]
    # Short answers against long rambles: the rates are set side by side with their lengths, and flagged.
    short = findings.findings(*_metrics(full_rep=0.5, full_len=5.0))
    assert "over texts of 5 tokens on average" in short[5] and "so these rates are not like for like" in short[5]


def test_training_findings_give_time_to_quality_and_overfitting():
    evs, tr, gq, compare = _metrics()
    text = " ".join(findings.findings(evs, tr, gq, compare))
    assert "Full fine-tuning reached LoRA's final validation loss (1.9000) after 2.5 s of training and 20,480 tokens (25% of its run)." in text
    assert "LoRA never reached full fine-tuning's final validation loss (1.1000); its best was 1.9000." in text
    assert "no sign of overfitting" in text
    tr["full"] |= {"val_rise_after_best": 0.05, "val_loss_se": 0.01}
    text = " ".join(findings.findings(evs, tr, gq, compare))
    assert ("Validation loss rose after its minimum for full fine-tuning (+0.0500 after step 100, beyond twice its "
            "standard error 0.0100): a sign of overfitting.") in text
    # A rise within the validation loss's own noise is no overfitting (once called on +0.0001).
    tr["full"] |= {"val_rise_after_best": 0.0001, "val_loss_se": 0.004}
    text = " ".join(findings.findings(evs, tr, gq, compare))
    assert ("Validation loss rose after its minimum for full fine-tuning (+0.0001, within twice its standard error "
            "0.0040): within the noise, no sign of overfitting.") in text and "a sign of overfitting" not in text


def test_no_model_is_named_the_lowest_unless_its_paired_intervals_put_it_below_both():
    """Too few units, or a tie: the perplexities are listed, no model is called the lowest, and the
    text finding, which compares against the lowest-perplexity model, is not written."""
    evs, tr, gq, compare = _metrics(full_ppl=6.9, lora_ppl=7.0)
    compare["paired"]["full_vs_lora"] = paired_ratio(6.9 / 7.0, half_width=0.05)  # a tie
    text = findings.findings(evs, tr, gq, compare)
    assert text[0].startswith("Test perplexity: full fine-tuning 6.90 (95% CI 6.55–7.25); LoRA 7.00")
    assert "(no model is named the lowest" in text[0]
    assert not any("gives the lowest" in t or "lowest-perplexity model" in t for t in text)
    evs, tr, gq, compare = _metrics()
    for pair in compare["paired"].values():
        del pair["lo"], pair["hi"]
        pair |= {"chunks": 7, "unit": "documents"}
    text = findings.findings(evs, tr, gq, compare)
    assert not any("gives the lowest" in t for t in text)
    assert text[1].startswith("The test split is too small to call a difference: it has 7 documents, its independent "
                              "units, and an interval needs at least 20; give it more documents")


def test_speeds_are_compared_only_like_with_like():
    evs, tr, gq, compare = _metrics()
    same = findings.findings(evs, tr, gq, compare)[-1]
    assert same.endswith("both trained on cpu (x86_64, 2 threads), fp32, 1 process, it ran at 1.25x full "
                         "fine-tuning's tokens/s with 1.00x its peak memory (cpu peak rss).")
    tr["lora"]["device"] = "cpu (x86_64, 1 thread)"
    other = findings.findings(evs, tr, gq, compare)[-1]
    assert "x full fine-tuning's tokens/s" not in other
    note = ("Full fine-tuning and LoRA trained under different conditions (full fine-tuning: cpu (x86_64, 2 threads), "
            "fp32, 1 process; LoRA: cpu (x86_64, 1 thread), fp32, 1 process): their times, speeds and memory are not "
            "compared.")
    assert other.endswith(note) and findings.conditions_differ(tr) == note


def test_too_few_chunks_give_no_interval_and_no_verdict():
    evs, tr, gq, compare = _metrics()
    for pair in compare["paired"].values():
        del pair["lo"], pair["hi"]
        pair["chunks"] = 1
    for pair in compare["forgetting"]["tiny-general-test"].values():
        del pair["lo"], pair["hi"]
        pair["chunks"] = 3
    out = findings.findings(evs, tr, gq, compare)
    assert out[1] == ("The test split is too small to call a difference: its scored tokens make 1 chunk(s) of 1,024 "
                      "tokens, and an interval needs at least 20 (20,480 scored tokens); score a larger split, or lower "
                      "evaluate.bootstrap_chunk where neighbouring tokens' losses are little correlated. No winner is "
                      "called; the ratios alone: full fine-tuning / the pretrained model ratio 0.300; LoRA / the "
                      "pretrained model ratio 0.700; full fine-tuning / LoRA ratio 0.429.")
    assert not any(word in " ".join(out) for word in ("lower test perplexity", "higher test perplexity", "a tie"))
    assert "but the set is too small to call a difference: its scored tokens make 3 chunk(s)" in out[2]
    assert "retains more" not in out[2] and "no measurable forgetting" not in out[2]


def test_the_findings_call_the_adapter_method_by_its_variants_name():
    """DoRA's findings once said "LoRA trains 4,480 parameters" beside a table row saying DoRA."""
    evs, tr, gq, compare = _metrics()
    tr["lora"]["variant"] = "DoRA"
    text = " ".join(findings.findings(evs, tr, gq, compare))
    assert "DoRA trains 4,096 parameters" in text and not re.search(r"\bLoRA\b", text)
    tr["lora"]["variant"] = "QLoRA"
    assert "QLoRA trains 4,096 parameters" in " ".join(findings.findings(evs, tr, gq, compare))
