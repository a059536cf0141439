"""The report's findings: sentences written from the metrics by fixed rules, never by hand.

Test perplexities are compared pairwise: a winner is called only when the paired 95% interval of
their ratio excludes 1, else a tie. Forgetting on general text, scored without paired data, is
called when the separate intervals do not overlap. Inputs are the metrics dicts the stages wrote:
evaluate (per model), train (full, lora), generation quality (per model), compare (paired).
"""

from __future__ import annotations

NAMES = {"pretrained": "the pretrained model", "full": "full fine-tuning", "lora": "LoRA"}


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _overlap(a: tuple[float, float], b: tuple[float, float]) -> bool:
    return a[0] <= b[1] and b[0] <= a[1]


def _ci(m: dict, prefix: str) -> tuple[float, float]:
    return m[f"{prefix}_lo"], m[f"{prefix}_hi"]


def _fmt(m: dict, prefix: str) -> str:
    return f"{m[prefix]:.2f} (95% CI {m[f'{prefix}_lo']:.2f}–{m[f'{prefix}_hi']:.2f})"


def paired_verdict(pair: dict) -> str:
    """'lower', 'higher' or 'tie': where the paired 95% interval of ppl(a)/ppl(b) lies against 1."""
    return "lower" if pair["hi"] < 1 else "higher" if pair["lo"] > 1 else "tie"


def perplexity_finding(ev: dict, paired: dict) -> list[str]:
    order = sorted(ev, key=lambda k: ev[k]["test_ppl"])
    best = order[0]
    out = [f"{_cap(NAMES[best])} gives the lowest test perplexity, {_fmt(ev[best], 'test_ppl')}; "
           + "; ".join(f"{NAMES[k]} {_fmt(ev[k], 'test_ppl')}" for k in order[1:]) + "."]
    for name, pair in paired.items():
        a, b = name.split("_vs_")
        ratio = f"ratio {pair['ratio']:.3f} (95% paired CI {pair['lo']:.3f}–{pair['hi']:.3f})"
        verdict = paired_verdict(pair)
        if verdict == "tie":
            out.append(f"{_cap(NAMES[a])} vs {NAMES[b]}: a tie on test perplexity, {ratio}; the paired interval "
                       "includes 1.")
        else:
            change = abs(pair["ratio"] - 1)
            out.append(f"{_cap(NAMES[a])} has a {verdict} test perplexity than {NAMES[b]} by {change:.1%}, {ratio}.")
    return out


def forgetting_finding(ev: dict) -> list[str]:
    out = []
    for name in ev["pretrained"].get("general", {}):
        base = ev["pretrained"]["general"][name]
        change = {k: 100 * (ev[k]["general"][name]["ppl"] / base["ppl"] - 1) for k in ("full", "lora")}
        forgot = {k: not _overlap(_ci(ev[k]["general"][name], "ppl"), _ci(base, "ppl")) for k in change}
        text = (f"On general text ({name}), perplexity changed {change['full']:+.1f}% after full fine-tuning "
                f"and {change['lora']:+.1f}% after LoRA, against the pretrained model's {base['ppl']:.2f}")
        if not any(forgot.values()):
            text += "; neither change lies outside the intervals: no measurable forgetting."
        else:
            more, less = ("full", "lora") if change["full"] > change["lora"] else ("lora", "full")
            text += f"; {NAMES[less]} retains more of the pretrained model's general ability"
            text += "" if forgot[more] else " (though the difference is within the intervals)"
            text += "."
        out.append(text)
    return out


def text_finding(ev: dict, gq: dict) -> list[str]:
    best = min(ev, key=lambda k: ev[k]["test_ppl"])
    others = [k for k in gq if k != best]
    rep = ", ".join(f"{NAMES[k]} {gq[k]['repetition_4gram']:.3f}" for k in others)
    dist = ", ".join(f"{NAMES[k]} {gq[k]['distinct_2']:.3f}" for k in others)
    more_repetitive = all(gq[best]["repetition_4gram"] > gq[k]["repetition_4gram"] for k in others)
    verdict = ("so here the lowest perplexity came with the most repetitive text" if more_repetitive
               else "so here the lowest perplexity did not come with the most repetitive text")
    return [f"The lowest-perplexity model ({NAMES[best]}) repeats 4-grams at rate "
            f"{gq[best]['repetition_4gram']:.3f} (vs {rep}) with distinct-2 {gq[best]['distinct_2']:.3f} "
            f"(vs {dist}), {verdict}."]


def _setup(m: dict) -> str:
    return f"{m['device']}, {m['precision']}, {m['processes']} process(es)"


def efficiency_finding(tr: dict) -> list[str]:
    """Speeds and memory are compared only between runs on the same device, threads, precision and
    process count; otherwise the finding says so instead of giving a ratio."""
    full, lora = tr["full"], tr["lora"]
    share = 100 * lora["trainable_params"] / full["trainable_params"]
    text = (f"LoRA trains {lora['trainable_params']:,} parameters ({share:.2f}% of full fine-tuning's "
            f"{full['trainable_params']:,}) and its artifact is {full['artifact_mb'] / lora['artifact_mb']:.0f}x smaller")
    if _setup(full) == _setup(lora):
        text += (f"; both trained on {_setup(full)}, it ran at {lora['tokens_per_s'] / full['tokens_per_s']:.2f}x "
                 f"full fine-tuning's tokens/s with {lora['peak_mem_gib'] / full['peak_mem_gib']:.2f}x its peak "
                 f"memory ({full['peak_mem_kind'].replace('_', ' ')}).")
    else:
        text += (f"; their speeds are not compared, since they trained on different setups (full fine-tuning: "
                 f"{_setup(full)}; LoRA: {_setup(lora)}).")
    return [text]


def training_finding(tr: dict, reach: dict) -> list[str]:
    out = []
    for m, other in (("full", "lora"), ("lora", "full")):
        r = reach[m]
        if "seconds" in r:
            share = r["seconds"] / tr[m]["train_s"] if tr[m]["train_s"] else 0.0
            out.append(f"{_cap(NAMES[m])} reached {NAMES[other]}'s final validation loss ({r['target']:.4f}) after "
                       f"{r['seconds']:.1f} s of training and {r['tokens']:,} tokens ({share:.0%} of its run).")
        else:
            out.append(f"{_cap(NAMES[m])} never reached {NAMES[other]}'s final validation loss ({r['target']:.4f}); "
                       f"its best was {tr[m]['val_loss_best']:.4f}.")
    rose = [m for m in ("full", "lora") if tr[m]["val_rise_after_best"] > 0]
    if rose:
        out.append("Validation loss rose after its minimum for " + " and ".join(
            f"{NAMES[m]} (+{tr[m]['val_rise_after_best']:.4f} after step {tr[m]['val_best_step']})" for m in rose)
            + ": a sign of overfitting.")
    else:
        out.append("Validation loss was lowest at the end of training for both methods: no sign of overfitting.")
    return out


def findings(ev: dict, tr: dict, gq: dict, paired: dict, reach: dict) -> list[str]:
    return (perplexity_finding(ev, paired) + forgetting_finding(ev) + text_finding(ev, gq)
            + training_finding(tr, reach) + efficiency_finding(tr))
