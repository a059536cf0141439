"""Hugging Face model cards for the two trained models, from the report's inputs only
(huggingface_hub.ModelCardData, so `ModelCard.load` reads them): metadata (base_model, its commit,
datasets, library_name, tags, license where the base has one, model-index with the test
perplexity and the task scores, each task's few-shot count with it) and a body with the study's numbers for the model, its training setup and how to
load it.

The report stage writes them to cards/<model>/README.md: a DVC output cannot lie inside another
(models/full is train_full's), and the test perplexity comes after training. Pushing a model
uploads its folder and its card (docs/experiments.md, "Use the trained models").
"""

from __future__ import annotations

from ftstudy.report.findings import change, with_interval
from ftstudy.report.reporting import instruct
from ftstudy.report.task_report import metrics_of

LIBRARY = {"full": "transformers", "lora": "peft"}


def _ppl(m: dict, key: str) -> str:
    """A perplexity with its interval, or the note that there is none (too few units)."""
    return with_interval(m, key, " (no interval: too few units)")


def _pct(pair: dict) -> str:
    return change(pair) + ("" if "lo" in pair else f" (no interval: too few {pair.get('unit', 'units')})")


def task_results(r, model: str) -> list:
    """model-index entries for the model's task scores: each lm-eval task (its Hub dataset and
    commit, or the task's own name for local data) with its few-shot count, and the held-out answers."""
    from huggingface_hub import EvalResult

    out = []
    for task, row in r.tasks[model].items():
        t = r.task_info[model].get("tasks", {}).get(task, {})
        src = t.get("source", {})
        hub = src.get("commit") is not None
        for metric in metrics_of(row):
            out.append(EvalResult(
                task_type="text-generation", task_name=task, dataset_type=src["dataset"] if hub else task,
                dataset_name=task, dataset_config=src.get("config") if hub else None, dataset_split=src.get("split"),
                dataset_revision=src.get("commit"), metric_type=metric, metric_value=round(row[metric], 4),
                dataset_args={"num_few_shot": t["num_fewshot"]} if "num_fewshot" in t else None))
    return out


def card(r, model: str) -> str:
    """The card of `model` ("full" or "lora"), as README.md text; `r`: ftstudy.report.inputs.Inputs."""
    from huggingface_hub import EvalResult, ModelCardData

    inputs = r.prepared["inputs"]
    base, data_in = inputs["model.name"], inputs["data.name"]
    hub_base = base["commit"] is not None
    hub_data = data_in["commit"] is not None
    ev, tr, label = r.ev[model], r.tr[model], r.label(model)
    source = r.protocol["source"]
    tags = ["ftstudy", "causal-lm", "text-generation", "full-fine-tune" if model == "full" else "lora"]
    if model == "lora" and "DoRA" in tr.get("variant", ""):
        tags.append("dora")
    metadata = ModelCardData(
        base_model=base["name"] if hub_base else None, base_model_relation="finetune" if model == "full" else "adapter",
        datasets=[source] if hub_data else None, library_name=LIBRARY[model], tags=tags,
        license=base.get("license"), pipeline_tag="text-generation", model_name=label,
        eval_results=[EvalResult(task_type="text-generation", dataset_type=source, dataset_name=source,
                                 dataset_config=r.protocol.get("config"), dataset_split="test", metric_type="perplexity",
                                 metric_value=round(ev["test_ppl"], 4),
                                 metric_name="Test perplexity" + (" (answer tokens)" if instruct(r)
                                                                  else " (sliding window)")),
                      *task_results(r, model)])
    yaml = metadata.to_yaml()
    if hub_base:
        yaml += f"\nbase_model_revision: {base['commit']}"
    base_line = (f"[`{base['name']}`](https://huggingface.co/{base['name']}) at commit `{base['commit']}`" if hub_base
                 else f"the model in a local folder, `{base['name']}` (sha256 {base.get('content_sha256', '')[:12]}; no Hub id)")
    pair = r.compare["paired"][f"{model}_vs_pretrained"]
    general = [f"- {g}: perplexity {_ppl(ev['general'][g], 'ppl')}, {_pct(r.compare['forgetting'][g][f'{model}_vs_pretrained'])} "
               "against the pretrained model" for g in ev.get("general", {})]
    load = ('model = AutoModelForCausalLM.from_pretrained("<this repo>")' if model == "full" else
            f'model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("{base["name"]}"'
            + (f', revision="{base["commit"]}"' if hub_base else "") + '), "<this repo>")')
    imports = ("from transformers import AutoModelForCausalLM, AutoTokenizer" if model == "full" else
               "from peft import PeftModel\nfrom transformers import AutoModelForCausalLM, AutoTokenizer")
    body = [f"# {label}", "",
            f"{'Full fine-tuning' if model == 'full' else tr.get('variant', 'LoRA')} of {base_line} on `{source}`"
            + (f" ({r.protocol['config']})" if r.protocol.get("config") else "") + ", trained and measured by the "
            "ftstudy pipeline (a DVC study of pretrained vs full fine-tuning vs LoRA).", "",
            "## Results", "",
            f"- Test perplexity: {_ppl(ev, 'test_ppl')} over {r.protocol['test_tokens']:,} scored tokens",
            f"- Against the pretrained model on the same test tokens: {_pct(pair)}",
            f"- Validation perplexity: {_ppl(ev, 'val_ppl')}", *general, "",
            "## Training", "",
            f"- Method: {'full fine-tuning, every weight' if model == 'full' else tr.get('variant', 'LoRA')}, "
            f"{tr['trainable_params']:,} trainable of {tr['total_params']:,} parameters"
            + (f", on {', '.join(tr['lora_target_modules'])}" if model == "lora" else ""),
            f"- {tr['steps']:,} optimizer steps, {tr['tokens']:,} tokens, global batch {tr['global_batch']}, "
            f"peak learning rate {tr.get('lr', 'as configured')}, seed {tr['seed']}",
            f"- {tr['precision']} on {tr['device']}, {tr['processes']} process{'' if tr['processes'] == 1 else 'es'}, "
            f"base weights {tr.get('base_dtype', 'fp32')}; "
            f"{tr['train_s']:.1f} s of training",
            f"- Data: `{source}`, column(s) {', '.join(r.prepared['columns'])}; "
            + (f"validation and test carved out of training rows (data.split_seed {r.prepared['split']['split_seed']})"
               if r.prepared["split"]["carved"] else "the source's own splits"), "",
            "## How to load", "", "```python", imports, load, "```", ""]
    return "---\n" + yaml + "\n---\n\n" + "\n".join(body)
