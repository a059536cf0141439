"""The report: metrics, their descriptive facts and the generations -> GitHub markdown (tabulate).

Nothing is recomputed here: every number is read from a metrics file the other stages wrote, and
the findings are written from those numbers by fixed rules (ftstudy/report/findings.py). Perplexities
measured under different protocols are never put in one column: the report refuses them.
"""

from __future__ import annotations

from pathlib import Path

from ftstudy.data import token_files
from ftstudy.measure import answers
from ftstudy.report import figures, task_report, update_report
from ftstudy.report.findings import (NAMES, as_change, by_ratio, conditions_differ, duration, findings, lowest, named,
                                     paired_verdict)
from ftstudy.report.inputs import MODELS, Inputs, short_name

_table = task_report.table


def _one_line(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _ppl(m: dict, prefix: str) -> str:
    if f"{prefix}_lo" not in m:
        return f"{m[prefix]:.2f} [no interval: too few units]"
    return f"{m[prefix]:.2f} [{m[f'{prefix}_lo']:.2f}, {m[f'{prefix}_hi']:.2f}]"


def _change(pair: dict) -> str:
    """A paired ratio as a change with its interval: '+3.1% [+2.0%, +4.2%]', or a factor ('960.5x')."""
    f = lambda v: as_change(v, by_ratio(pair))  # noqa: E731
    return f(pair["ratio"]) + (f" [{f(pair['lo'])}, {f(pair['hi'])}]" if "lo" in pair else f" [too few {pair['unit']}]")


def headline(r: Inputs) -> list[str]:
    rows = [[r.label(m), f"{r.ev[m]['test_ppl']:.2f}", duration(r.tr[m]["train_s"]) if m in r.tr else "no training",
             f"{r.tr[m]['peak_mem_gib']:.2f} GiB" if m in r.tr else "–"] for m in MODELS]
    prompt = r.gen["pretrained"][0]["prompt"]
    texts = [f"- **{r.label(m)}**: {_shown(r, prompt, r.gen[m][0]['greedy'])}" for m in MODELS]
    source = short_name(r.protocol["source"]) + (f" ({r.protocol['config']})" if r.protocol.get("config") else "")
    return [f"# {r.name} on {source}: pretrained vs full fine-tuning vs LoRA", "",
            ("Test perplexity on the answer tokens, each example scored alone; lower is better." if instruct(r)
             else "Test perplexity: sliding window, lower is better."), "",
            _table(rows, ["Model", "Test perplexity", "Training time", "Peak memory"]), "",
            *([named(differ, r.tr), ""] if (differ := conditions_differ(r.tr)) else []),
            f"Greedy {'answers to' if instruct(r) else 'continuations of'} the prompt *{_one_line(prompt)}*:", "",
            *texts, ""]


def _shown(r: Inputs, prompt: str, text: str) -> str:
    """A generated text as the report shows it: running text goes on from its prompt, shown with it;
    an instruction model's answer stands alone, its prompt (the chat template's system prompt
    included) shown once above it, never glued to it."""
    return _one_line(text) if instruct(r) else _one_line(prompt + text)


def headline_metrics(r: Inputs) -> dict:
    """The figures a decision reads, flat, each name unique among the metrics files (so that a
    `dvc exp show --keep` pattern such as '_ppl$' picks them alone): each model's test perplexity
    with its interval (where there is one), each method's training seconds and peak memory, the
    paired test perplexity ratios with theirs, and each model's task scores with theirs."""
    out: dict = {}
    for m in MODELS:
        ev = r.ev[m]
        out[f"{m}_ppl"] = ev["test_ppl"]
        out |= {f"{m}_ppl_{end}": ev[f"test_ppl_{end}"] for end in ("lo", "hi") if f"test_ppl_{end}" in ev}
    for m in ("full", "lora"):
        out |= {f"{m}_train_s": r.tr[m]["train_s"], f"{m}_peak_gib": r.tr[m]["peak_mem_gib"]}
    for name, pair in r.compare["paired"].items():
        out[name] = pair["ratio"]
        out |= {f"{name}_{end}": pair[end] for end in ("lo", "hi") if end in pair}
    return out | task_report.headline_metrics(r.tasks)


def instruct(r: Inputs) -> bool:
    return token_files.is_instruct(r.protocol)


ANSWERS = {"prompt_completion": "the completion and the EOS after it",
           "messages": "each assistant turn as the chat template renders it, its end-of-turn token included"}


def protocol_text(r: Inputs) -> str:
    """How the test and validation perplexities were scored, and the interval's rule."""
    p, b = r.protocol, r.protocol["bootstrap"]
    if instruct(r):
        masking = ("every token (data.train_on_prompt: true)" if r.tr["full"].get("train_on_prompt")
                   else "the answer tokens alone (data.train_on_prompt: false)")
        padding = r.tr["full"].get("padding_share")
        return (f"Instruction data, format `{p['format']}`: the answer is {ANSWERS[p['format']]}. Training loss over "
                f"{masking}; examples batched by padding to the longest of each micro-batch"
                + (f" ({padding:.0%} of full fine-tuning's batch positions were padding)" if padding is not None else "")
                + f". Perplexity over the answer tokens alone, each example scored by itself: "
                f"{p['test_tokens']:,} answer tokens of {p['test_examples']:,} test examples, {p['val_tokens']:,} "
                f"validation answer tokens. Intervals: percentile bootstrap, {b['samples']:,} resamples of whole "
                f"examples, seed {b['seed']}, given only from {b['min_chunks']} examples on.")
    units = b.get("units", {})
    test_unit = units.get("test", "chunks")
    resampled = (f"whole {test_unit} (the test split's independent units; each token's loss counted in the "
                 f"{test_unit.removesuffix('s')} it belongs to)" if test_unit != "chunks"
                 else f"{b['chunk']:,}-token chunks (the text has no documents to resample)")
    general = sorted({u for k, u in units.items() if k not in ("test", "validation")} - {test_unit})
    return (f"Sliding window: {p['context']}-token windows moved by {p['stride']} tokens, every token "
            f"but the first scored once ({p['test_tokens']:,} test, {p['val_tokens']:,} validation "
            f"tokens). Blocks: non-overlapping {p['context']}-token blocks, tail dropped "
            f"({p['test_tokens_blocks']:,} test tokens). Intervals: percentile bootstrap, "
            f"{b['samples']:,} resamples of {resampled}, seed {b['seed']}, given only from {b['min_chunks']} "
            f"{'units' if test_unit != 'chunks' else 'chunks'} on"
            + (f"; the general sets resample {' or '.join(general)}" if general else "") + ".")


def efficiency(r: Inputs) -> list[str]:
    tr, lora = r.tr, r.tr["lora"]
    rows = [[r.label(m), duration(tr[m]["train_s"]), f"{tr[m]['warmup_s']:.1f} s", f"{tr[m]['tokens_per_s']:,.0f}",
             f"{tr[m]['mfu']:.1%}" if "mfu" in tr[m] else "–", f"{tr[m]['peak_mem_gib']:.2f} GiB",
             f"{tr[m]['trainable_params']:,}", f"{tr[m]['total_params']:,}", f"{tr[m]['artifact_mb']:,.2f}"] for m in tr]
    mfu = (f"MFU: FLOPs per token 4N + 2N' + 12·L·d·T (6N + 12·L·d·T for full fine-tuning, about 4N for LoRA's frozen "
           f"base; N: the parameters a token's matmuls use, all but the embedding tables, the output projection "
           f"counted once; N': the trainable ones) over the device's peak, "
           f"{tr['full']['peak_flops'] / 1e12:,.3g} TFLOP/s ({tr['full']['peak_flops_source']}). "
           if tr["full"].get("peak_flops") else
           "No MFU on a CPU: it has no data-sheet peak, and a measured one moved 2x between runs. ")
    return ["## Efficiency", "",
            _table(rows, ["Model", "Training time", "Warm-up", "Tokens/s (steady)", "MFU", "Peak memory",
                          "Trainable params", "Total params", "Artifact (MB)"]), "",
            *([named(differ, tr), ""] if (differ := conditions_differ(tr)) else []),
            f"Training time is the loop alone; warm-up is the first log interval of each process (compilation "
            f"included; a resumed run has one per process), excluded from the steady-state tokens/s. " + mfu
            + f"Peak memory is {tr['full']['peak_mem_kind'].replace('_', ' ')}. Base weights: full fine-tuning "
            f"{tr['full'].get('base_dtype', 'fp32')}, {lora.get('variant', 'LoRA')} {lora.get('base_dtype', 'fp32')}"
            + (" quantized to 4-bit NF4" if "QLoRA" in lora.get("variant", "") or "4-bit" in lora.get("variant", "") else "")
            + f". {lora.get('variant', 'LoRA')} integrity: "
            f"{lora['trainable_params']:,} trainable parameters in the wrapped layers "
            f"({', '.join(lora['lora_target_modules'])}), checked equal to r x (in + out) over them"
            + (" plus DoRA's magnitudes" if "DoRA" in lora.get("variant", "") else "")
            + f"; the saved adapter on a fresh base scores tokens as the trained model did within "
            f"{lora['reload_max_abs_diff']:.2e} nats"
            + (f", and merged vs base+adapter within {lora['merge_max_abs_diff']:.2e}" if "merge_max_abs_diff" in lora
               else " (no merge check: merging into a 4-bit base rounds the weights)")
            + f"; adapter weights {lora['adapter_mb']:.2f} MB vs the base model's "
            f"folder {lora['base_model_mb']:.2f} MB (Artifact counts each saved folder, tokenizer included"
            + (f"; LoRA's leaves out the merged model saved beside it, {lora['merged_mb']:,.2f} MB" if "merged_mb" in lora
               else "") + ").", ""]


def validation(r: Inputs) -> list[str]:
    tr, reach = r.tr, r.compare["time_to_quality"]
    rows = [[r.label(m), f"{tr[m]['val_loss_best']:.4f} (step {tr[m]['val_best_step']})", f"{tr[m]['val_loss']:.4f}",
             (f"+{tr[m]['val_rise_after_best']:.4f}" + (f" (± {2 * tr[m]['val_loss_se']:.4f})" if "val_loss_se" in tr[m] else ""))
             if tr[m]["val_rise_after_best"] > 0 else "no",
             duration(tr[m]["eval_s"]),
             f"{duration(reach[m]['seconds'])}, {reach[m]['tokens']:,} tokens" if "seconds" in reach[m] else "never"]
            for m in tr]
    every, full = tr["full"]["eval_every"], tr["full"]
    unit = "examples" if instruct(r) else "blocks"
    sample = (f"each pass on the same seeded {full['val_units_scored']:,} of the {full['val_units']:,} validation {unit} "
              f"(the sample train.eval_budget sizes; evaluate scores them all)"
              if full.get("val_units_scored", 0) < full.get("val_units", 0) else f"each pass on all validation {unit}")
    return ["### Validation during training", "",
            _table(rows, ["Model", "Best val loss (step)", "Final val loss", "Rose after best", "Validation time",
                          "Reached the other's final val loss after"]), "",
            f"Validation loss ({'answer tokens of the validation examples' if instruct(r) else 'run_clm blocks'}) "
            f"every {every or 'epoch'}{' optimizer steps' if every else ''}, {sample}; a rise after the best counts as "
            "overfitting only beyond twice the final loss's standard error over those units (±). Its time is "
            "reported apart and left out of training time and tokens/s. Curves: `dvc plots show` (against step and "
            "against training seconds).", ""]


def quality(r: Inputs) -> list[str]:
    ev, protocol = r.ev, r.protocol
    general = list(ev["pretrained"]["general"])
    rows = []
    blocks = not instruct(r)
    for m in MODELS:
        row = [r.label(m), _ppl(ev[m], "val_ppl"), _ppl(ev[m], "test_ppl"), f"{ev[m]['test_bpb']:.4f}"]
        row += [f"{ev[m]['val_ppl_blocks']:.2f}", f"{ev[m]['test_ppl_blocks']:.2f}"] if blocks else []
        for g in general:
            change = "–" if m == "pretrained" else _change(r.compare["forgetting"][g][f"{m}_vs_pretrained"])
            row += [_ppl(ev[m]["general"][g], "ppl"), change]
        rows.append(row)
    headers = (["Model", "Val ppl [95% CI]", "Test ppl [95% CI]", "Test bits/byte"]
               + (["Val ppl (blocks)", "Test ppl (blocks)"] if blocks else [])
               + [h for g in general for h in (f"{g} ppl [95% CI]", f"{g} change [95% paired CI]")])
    return ["## Quality", "", _table(rows, headers), "",
            f"{protocol_text(r)} Changes on general text (always scored as running text, by the sliding window) are "
            f"relative to the pretrained model, with the paired interval of the two models' ratio on the same "
            f"tokens. {scoring(r)} Tokenizer "
            f"`{protocol['tokenizer']}`, "
            + (f"BOS token `{protocol['bos']['token']}` before each split's running text and each document"
               if protocol.get("bos")
               else "no BOS token (the tokenizer adds none)")
            + f"; corpus `{protocol['source']}`, {'column' if len(r.prepared['columns']) == 1 else 'columns'} {', '.join(f'`{c}`' for c in r.prepared['columns'])}: "
            + ", ".join(f"{s} {v['tokens']:,} tokens ({v['documents']:,} {'examples' if 'answer_tokens' in v else 'rows'}"
                        + (f", {v['truncated']:,} cut to data.block_size, {v['dropped_no_answer']:,} dropped with no "
                           f"answer left" if v.get("truncated") or v.get("dropped_no_answer") else "") + ")"
                        for s, v in r.corpus.items()) + ". "
            + split_made(r) + "Inputs: " + "; ".join(_source(key, v) for key, v in r.prepared["inputs"].items()) + ".", ""]


def scoring(r: Inputs) -> str:
    """How every model was scored: the checked path, or the model's own forward and why, and the
    precision."""
    precision = ("fp32 throughout" if r.protocol["precision"] == "fp32" else
                 "the body under bf16 autocast, the output projection and log-softmax in fp32")
    own = {m: r.ev[m]["scoring"] for m in MODELS if r.ev[m]["scoring"]["own_forward"]}
    checked = [r.ev[m]["scoring"]["checked_max_nll_diff"] for m in MODELS if m not in own]
    text = ""
    if checked:
        text = (f"Scoring: through each model's body and output projection, checked against its own forward on "
                f"one window before scoring (largest per-token NLL difference {max(checked):.1e} nats); {precision}.")
    for m, how in own.items():
        text += f" {r.label(m)} was scored through its own forward (whole logits): {how['reason']}."
    return text.strip()


def split_made(r: Inputs) -> str:
    """How validation and test were made: the source's own, or carved out of training rows; and the
    duplicates removed."""
    split = r.prepared["split"]
    text = ""
    if split["carved"]:
        shares = " and ".join(f"{s} {split[f'{s}_fraction']:.0%}" for s in split["carved"])
        text = (f"Split made here: {' and '.join(split['carved'])} carved out of the source's training rows by a keyed "
                f"hash of each row's text (data.split_seed {split['split_seed']}; {shares} of the rows on average; an exact duplicate "
                "always joins its twin). ")
    removed = {s: v["duplicates_removed"] for s, v in r.corpus.items() if v["duplicates_removed"]}
    if removed:
        text += ("Exact duplicates of an earlier split's documents removed: "
                 + ", ".join(f"{n:,} from {s}" for s, n in removed.items()) + ". ")
    return text


def _source(key: str, source: dict) -> str:
    """'model.name `gpt2` at commit 607a30d783df (asked main)', or '... (local, sha256 1a2b3c4d5e6f)'."""
    if source["commit"] is None:
        return f"{key} `{source['name']}` (local, sha256 {source['content_sha256'][:12]})"
    asked = "" if source["commit"].startswith(source["revision"]) else f" (asked {source['revision']})"
    return f"{key} `{source['name']}` at commit {source['commit'][:12]}{asked}"


def paired_comparisons(r: Inputs) -> list[str]:
    verdict_text = {"lower": "lower perplexity", "higher": "higher perplexity", "tie": "tie"}
    rows = [[f"{r.label(a)} / {r.label(b)}",
             f"{v['ratio']:.3f} [{v['lo']:.3f}, {v['hi']:.3f}]" if "lo" in v else f"{v['ratio']:.3f} [too few {v['unit']}]",
             verdict_text.get(paired_verdict(v), f"no call: too few {v['unit']}")]
            for name, v in r.compare["paired"].items() for a, b in [name.split("_vs_")]]
    unit = next(iter(r.compare["paired"].values()))["unit"]
    return [_table(rows, ["Comparison", "Test ppl ratio [95% paired CI]", "Verdict"]), "",
            f"Paired: both models are scored on the same test tokens, and each bootstrap resample draws the same "
            f"{unit} for both, so the interval covers their difference alone; a winner is called only when it "
            "excludes 1.", ""]


def generation_quality(r: Inputs) -> list[str]:
    gq, gen = r.gq, r.gen
    rows = [[r.label(m), f"{gq[m]['distinct_1']:.3f}", f"{gq[m]['distinct_2']:.3f}", f"{gq[m]['repetition_4gram']:.3f}",
             f"{gq[m]['mean_length']:.1f}", f"{gq[m]['eos_rate']:.2f}", str(gq[m]["texts"])] for m in MODELS]
    if instruct(r):  # each prompt once, then every model's answers to it
        samples = [line for k, p in enumerate(gen["pretrained"]) for line in (
            f"- Prompt {k + 1}: *{_one_line(p['prompt'])}*",
            *(f"  - **{r.label(m)}** ({'greedy' if i == 0 else f'sample {i}'}): {_one_line(t)}"
              for m in MODELS for i, t in enumerate([gen[m][k]["greedy"], *gen[m][k]["samples"]])))]
    else:
        samples = [f"- **{r.label(m)}** ({'greedy' if i == 0 else f'sample {i}'}): {_one_line(p['prompt'] + t)}"
                   for m in MODELS for p in gen[m] for i, t in enumerate([p["greedy"], *p["samples"]])]
    return ["## Generation quality", "",
            _table(rows, ["Model", "Distinct-1", "Distinct-2", "Repeated 4-grams", "Mean length (tokens)",
                          "Stops at EOS", "Texts"]), "",
            f"Over each model's distinct continuations of {len(gen['pretrained'])} prompt(s): the greedy one and "
            "the seeded samples, a continuation that repeats another counted once.", "",
            "<details><summary>All generated texts</summary>", "", *samples, "", "</details>", "", *heldout(r)]


def _cell(text: str, limit: int = 240) -> str:
    text = _one_line(text)
    return text if len(text) <= limit else text[:limit - 1] + "…"


def heldout(r: Inputs) -> list[str]:
    """Held-out test prompts: the reference answer and each model's, side by side."""
    if not r.heldout["pretrained"]:
        return []
    rows = [[_cell(item["prompt"]), _cell(item["reference"]), *(_cell(r.heldout[m][i]["answer"]) or "(empty)" for m in MODELS)]
            for i, item in enumerate(r.heldout["pretrained"])]
    return ["### Answers to held-out test prompts", "",
            _table(rows, ["Prompt", "Reference", *(r.label(m) for m in MODELS)]), "",
            f"The first {len(rows)} (generate.test_prompts) of the held-out test examples every model answered (a sample "
            "drawn with data.split_seed, the same for every model and training seed); greedy answers, each stopped at EOS or the chat template's "
            "end of turn, or at twice its reference's tokens."
            + (" Their scores over all of them: Tasks, held-out answers." if answers.TASK in r.tasks["pretrained"] else "")
            + (f" {cut} held-out example(s) were left out of answer scoring: their reference was cut to "
               "data.block_size tokens, and a whole, correct answer would score below 1 against it."
               if (cut := r.gq["pretrained"].get("answers_truncated_left_out")) else ""),
            ""]


def environment(r: Inputs) -> list[str]:
    full = r.tr["full"]
    versions = ", ".join(f"{k} {v or 'none'}" for k, v in full["versions"].items())
    setups = [(m, tr) for m, tr in r.tr.items()] if conditions_differ(r.tr) else [(None, full)]
    return ["## Environment", "",
            *(f"- Training device{'' if m is None else f' ({NAMES[m]})'}: {tr['device']}; precision {tr['precision']}; "
              f"{tr['processes']} process{'' if tr['processes'] == 1 else 'es'}, global batch {tr['global_batch']} "
              f"{'examples' if instruct(r) else 'blocks'}" for m, tr in setups),
            f"- Evaluation precision: {r.protocol['precision']}",
            f"- Versions: {versions}",
            f"- Seed: {full['seed']}", ""]


def _picture(pictures: dict, name: str) -> list[str]:
    return [f"![{pictures[name][0]}]({pictures[name][1]})", ""] if name in pictures else []


def render(r: Inputs, figures_dir: Path | None = None, link: str = "") -> str:
    """The report as markdown, from the inputs (Inputs.read); with `figures_dir`, its pictures
    drawn there and linked as `link` + file name (the folder's path from the report's)."""
    found = findings(r.ev, r.tr, r.gq, r.compare)
    better = task_report.directions(r.task_info["pretrained"])
    found += [named(f, r.tr) for f in task_report.task_findings(r.tasks, r.compare.get("tasks", {}),
                                                                      lowest(r.ev, r.compare["paired"]), better)]
    pictures = {}
    labels = {m: r.label(m) for m in MODELS}
    if figures_dir is not None:
        for alt, name in figures.draw(r.ev, r.curves, labels, figures_dir, r.tasks, r.updates):
            pictures[name] = (alt, link + name)
    found += [named(f, r.tr) for f in update_report.finding(r.updates, r.compare["forgetting"])]
    return "\n".join([*headline(r), *_picture(pictures, "test_ppl.png"), *efficiency(r), *validation(r),
                      *_picture(pictures, "val_loss.png"), *quality(r), *_picture(pictures, "tradeoff.png"),
                      *paired_comparisons(r),
                      *task_report.tasks_section(r.tasks, r.compare.get("tasks", {}), labels, _picture(pictures, "tasks.png"),
                                                 better),
                      *update_report.section(r.updates, labels, _picture(pictures, "updates.png")),
                      *generation_quality(r), "## Findings", "",
                      *[f"- {f}" for f in found], "", *environment(r)])
