"""The report's findings: sentences written from the metrics by fixed rules, never by hand.

Perplexities are compared pairwise, on the test split and on each general set (forgetting): a
winner is called only when the paired 95% interval of their ratio excludes 1, else a tie; with too
few chunks for an interval, no call at all, and the finding says how many tokens would do. Inputs
are the metrics dicts the stages wrote: evaluate (per model), train (full, lora), generation
quality (per model), compare.
"""

from __future__ import annotations

import re

NAMES = {"pretrained": "the pretrained model", "full": "full fine-tuning", "lora": "LoRA"}


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def with_interval(m: dict, key: str, missing: str = "") -> str:
    """m[key] with its 95% interval (m[key_lo], m[key_hi]), or with `missing` where it has none."""
    if f"{key}_lo" not in m:
        return f"{m[key]:.2f}{missing}"
    return f"{m[key]:.2f} (95% CI {m[f'{key}_lo']:.2f}–{m[f'{key}_hi']:.2f})"


def _fmt(m: dict, key: str) -> str:
    return with_interval(m, key, " (no interval: too few units)")


def paired_verdict(pair: dict) -> str:
    """'lower', 'higher' or 'tie': where the paired 95% interval of ppl(a)/ppl(b) lies against 1;
    'too few' when there were too few chunks for an interval (ftstudy.measure.stats.MIN_CHUNKS)."""
    if "lo" not in pair:
        return "too few"
    return "lower" if pair["hi"] < 1 else "higher" if pair["lo"] > 1 else "tie"


def _ratio(pair: dict) -> str:
    if "lo" not in pair:
        return f"ratio {pair['ratio']:.3f}"
    return f"ratio {pair['ratio']:.3f} (95% paired CI {pair['lo']:.3f}–{pair['hi']:.3f})"


def as_change(ratio: float, as_ratio: bool) -> str:
    """A ratio of perplexities as a change, '+3.1%' (never '-0.0%'), or as a factor, '960.5x', which
    reads better than '+95952.0%'."""
    if as_ratio:
        return f"{ratio:,.1f}x" if ratio >= 10 else f"{ratio:.2f}x"
    return f"{round(100 * (ratio - 1), 1) + 0.0:+.1f}%"


def by_ratio(pair: dict) -> bool:
    """Whether a change reads better as a factor: the ratio (or its interval) at 2 or more, or at 1/2 or less."""
    values = [pair["ratio"], pair.get("lo", pair["ratio"]), pair.get("hi", pair["ratio"])]
    return max(values) >= 2 or min(values) <= 0.5


def change(pair: dict) -> str:
    """A paired ratio as a change: '+3.1% (95% paired CI +2.0% to +4.2%)', or '960.5x (95% paired
    CI 900.2x to 1,010.0x)' where the change is a factor of 2 or more."""
    f = lambda v: as_change(v, by_ratio(pair))  # noqa: E731
    return f(pair["ratio"]) + (f" (95% paired CI {f(pair['lo'])} to {f(pair['hi'])})" if "lo" in pair else "")


def too_small(what: str, pair: dict, bootstrap: dict) -> str:
    """Why no difference is called on `what`: how many independent units it has (pair["unit"]:
    examples, documents, articles, or chunks of a running text) and how many would do."""
    unit, count, need = pair.get("unit", "chunks"), pair["chunks"], bootstrap["min_chunks"]
    if unit != "chunks":
        more = ("more examples (data.test_fraction, or a larger test file)" if unit == "examples"
                else f"more {unit} (a larger split, or data.test_fraction where the split is carved)")
        return (f"{what} is too small to call a difference: it has {count} {unit.removesuffix('s') if count == 1 else unit}, "
                f"its independent units, and an interval needs at least {need}; give it {more}")
    chunk = bootstrap["chunk"]
    return (f"{what} is too small to call a difference: its scored tokens make {count} chunk(s) of "
            f"{chunk:,} tokens, and an interval needs at least {need} ({need * chunk:,} scored tokens); score a "
            "larger split, or lower evaluate.bootstrap_chunk where neighbouring tokens' losses are little "
            "correlated")


def _beats(model: str, other: str, paired: dict) -> bool:
    """Whether the paired interval puts `model`'s test perplexity below `other`'s."""
    if f"{model}_vs_{other}" in paired:
        return paired_verdict(paired[f"{model}_vs_{other}"]) == "lower"
    return paired_verdict(paired[f"{other}_vs_{model}"]) == "higher"


def lowest(ev: dict, paired: dict) -> str | None:
    """The model whose test perplexity the paired intervals put below every other's, or None where
    they do not (a tie, or too few units): then no model is named the lowest."""
    best = min(ev, key=lambda k: ev[k]["test_ppl"])
    return best if all(_beats(best, other, paired) for other in ev if other != best) else None


def perplexity_finding(ev: dict, paired: dict, bootstrap: dict) -> list[str]:
    order = sorted(ev, key=lambda k: ev[k]["test_ppl"])
    best = lowest(ev, paired)
    if best is not None:
        out = [f"{_cap(NAMES[best])} gives the lowest test perplexity, {_fmt(ev[best], 'test_ppl')}; "
               + "; ".join(f"{NAMES[k]} {_fmt(ev[k], 'test_ppl')}" for k in order[1:]) + "."]
    else:
        out = ["Test perplexity: " + "; ".join(f"{NAMES[k]} {_fmt(ev[k], 'test_ppl')}" for k in order)
               + " (no model is named the lowest: the paired intervals below do not put one under both others)."]
    if any(paired_verdict(pair) == "too few" for pair in paired.values()):
        ratios = "; ".join(f"{NAMES[a]} / {NAMES[b]} {_ratio(pair)}" for name, pair in paired.items()
                           for a, b in [name.split("_vs_")])
        return out + [f"{too_small('The test split', next(iter(paired.values())), bootstrap)}. No winner is "
                      f"called; the ratios alone: {ratios}."]
    for name, pair in paired.items():
        a, b = name.split("_vs_")
        verdict = paired_verdict(pair)
        if verdict == "tie":
            out.append(f"{_cap(NAMES[a])} vs {NAMES[b]}: a tie on test perplexity, {_ratio(pair)}; the paired "
                       "interval includes 1.")
        else:
            change = abs(pair["ratio"] - 1)
            out.append(f"{_cap(NAMES[a])} has a {verdict} test perplexity than {NAMES[b]} by {change:.1%}, "
                       f"{_ratio(pair)}.")
    return out


def retained(pairs: dict) -> str:
    """compare's forgetting call on one general set: "too few" (units for an interval), "none" (neither
    method's paired interval lies above the pretrained model's), else which method retains more,
    "lora" or "full", or "tie" (within the paired interval of the two)."""
    if any(paired_verdict(pair) == "too few" for pair in pairs.values()):
        return "too few"
    if "higher" not in (paired_verdict(pairs["full_vs_pretrained"]), paired_verdict(pairs["lora_vs_pretrained"])):
        return "none"
    return {"higher": "lora", "lower": "full"}.get(paired_verdict(pairs["full_vs_lora"]), "tie")


def forgetting_finding(ev: dict, forgetting: dict, bootstrap: dict) -> list[str]:
    """Per general set: each method's change against the pretrained model, called from the paired
    interval of their ratio (the same tokens scored by both), and which method kept more."""
    out = []
    for name, pairs in forgetting.items():
        base = ev["pretrained"]["general"][name]
        text = (f"On general text ({name}), perplexity changed {change(pairs['full_vs_pretrained'])} after full "
                f"fine-tuning and {change(pairs['lora_vs_pretrained'])} after LoRA, against the pretrained model's "
                f"{base['ppl']:.2f}")
        call = retained(pairs)
        if call == "too few":
            out.append(f"{text}; but {too_small('the set', pairs['full_vs_pretrained'], bootstrap)}.")
            continue
        if call == "none":
            # in the terms the changes are printed in: a factor (1x) or a percentage (+0%)
            none = "1x" if any(by_ratio(pairs[f"{k}_vs_pretrained"]) for k in ("full", "lora")) else "+0%"
            text += f"; neither paired interval lies wholly above {none}: no measurable forgetting."
        elif call == "tie":
            text += (f"; which method retains more is within the paired interval (full fine-tuning over LoRA: "
                     f"{_ratio(pairs['full_vs_lora'])}).")
        else:
            text += (f"; {NAMES[call]} retains more of the pretrained model's general ability (full "
                     f"fine-tuning over LoRA: {_ratio(pairs['full_vs_lora'])}).")
        out.append(text)
    return out


def text_finding(ev: dict, gq: dict, paired: dict) -> list[str]:
    best = lowest(ev, paired)
    if best is None:  # no lowest-perplexity model to set against the others
        return []
    others = [k for k in gq if k != best]
    rep = ", ".join(f"{NAMES[k]} {gq[k]['repetition_4gram']:.3f}" for k in others)
    dist = ", ".join(f"{NAMES[k]} {gq[k]['distinct_2']:.3f}" for k in others)
    more_repetitive = all(gq[best]["repetition_4gram"] > gq[k]["repetition_4gram"] for k in others)
    verdict = ("so here the lowest perplexity came with the most repetitive text" if more_repetitive
               else "so here the lowest perplexity did not come with the most repetitive text")
    lengths = {k: gq[k]["mean_length"] for k in gq}
    span = (f" over texts of {lengths[best]:.0f} tokens on average (vs "
            + ", ".join(f"{NAMES[k]} {lengths[k]:.0f}" for k in others) + ")")
    if max(lengths.values()) > 2 * max(min(lengths.values()), 1e-9):
        span += ("; the lengths differ by more than 2x, and longer texts repeat more by themselves, so these rates "
                 "are not like for like")
    return [f"The lowest-perplexity model ({NAMES[best]}) repeats 4-grams at rate "
            f"{gq[best]['repetition_4gram']:.3f} (vs {rep}) with distinct-2 {gq[best]['distinct_2']:.3f} "
            f"(vs {dist}){span}; {verdict}."]


def _times(ratio: float) -> str:
    return f"{ratio:.0f}x" if ratio >= 10 else f"{ratio:.1f}x"


def _setup(m: dict) -> str:
    return f"{m['device']}, {m['precision']}, {m['processes']} process{'' if m['processes'] == 1 else 'es'}"


def conditions_differ(tr: dict) -> str | None:
    """A sentence saying full fine-tuning and LoRA trained under different conditions (device and
    threads, precision, processes), or None when they did not."""
    full, lora = tr["full"], tr["lora"]
    if _setup(full) == _setup(lora):
        return None
    return (f"Full fine-tuning and LoRA trained under different conditions (full fine-tuning: {_setup(full)}; "
            f"LoRA: {_setup(lora)}): their times, speeds and memory are not compared.")


def efficiency_finding(tr: dict) -> list[str]:
    """Speeds and memory are compared only between runs on the same device, threads, precision and
    process count; otherwise the finding says so instead of giving a ratio."""
    full, lora = tr["full"], tr["lora"]
    share = 100 * lora["trainable_params"] / full["trainable_params"]
    text = (f"LoRA trains {lora['trainable_params']:,} parameters ({share:.2f}% of full fine-tuning's "
            f"{full['trainable_params']:,}) and its artifact is {_times(full['artifact_mb'] / lora['artifact_mb'])} smaller")
    if (differ := conditions_differ(tr)) is None:
        text += (f"; both trained on {_setup(full)}, it ran at {lora['tokens_per_s'] / full['tokens_per_s']:.2f}x "
                 f"full fine-tuning's tokens/s with {lora['peak_mem_gib'] / full['peak_mem_gib']:.2f}x its peak "
                 f"memory ({full['peak_mem_kind'].replace('_', ' ')}).")
    else:
        text += ". " + differ
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
    # A rise is called overfitting only beyond twice the final validation loss's standard error over
    # the validation units: a smaller one is within what another sample of the split would give.
    noise = {m: 2 * tr[m].get("val_loss_se", 0.0) for m in ("full", "lora")}
    rose = [m for m in ("full", "lora") if tr[m]["val_rise_after_best"] > noise[m]]
    within = [m for m in ("full", "lora") if 0 < tr[m]["val_rise_after_best"] <= noise[m]]
    if rose:
        out.append("Validation loss rose after its minimum for " + " and ".join(
            f"{NAMES[m]} (+{tr[m]['val_rise_after_best']:.4f} after step {tr[m]['val_best_step']}, beyond twice its "
            f"standard error {tr[m]['val_loss_se']:.4f})" for m in rose) + ": a sign of overfitting.")
    if within:
        out.append("Validation loss rose after its minimum for " + " and ".join(
            f"{NAMES[m]} (+{tr[m]['val_rise_after_best']:.4f}, within twice its standard error "
            f"{tr[m]['val_loss_se']:.4f})" for m in within) + ": within the noise, no sign of overfitting.")
    if not rose and not within:
        out.append("Validation loss was lowest at the end of training for both methods: no sign of overfitting.")
    return out


def named(text: str, tr: dict) -> str:
    """`text` with the adapter method called by its variant's name (DoRA, QLoRA, rsLoRA, ...; the
    train info's `variant`), as the tables call it: the rules write "LoRA" for any of them."""
    variant = tr["lora"].get("variant", "LoRA")
    return text if variant == "LoRA" else re.sub(r"\bLoRA\b", variant, text)


def findings(ev: dict, tr: dict, gq: dict, compare: dict) -> list[str]:
    """Every finding, from the evaluate, train and generation-quality metrics and compare's
    (paired, forgetting, time_to_quality, bootstrap)."""
    out = (perplexity_finding(ev, compare["paired"], compare["bootstrap"])
           + forgetting_finding(ev, compare["forgetting"], compare["bootstrap"])
           + text_finding(ev, gq, compare["paired"])
           + training_finding(tr, compare["time_to_quality"]) + efficiency_finding(tr))
    return [named(f, tr) for f in out]


def duration(seconds: float) -> str:
    """3.4 s under a minute, else 1:03 min (or 1:02:03 h)."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    m, s = divmod(round(seconds), 60)
    if m < 60:
        return f"{m}:{s:02d} min"
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d} h"
