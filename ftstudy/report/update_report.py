"""The report's section on what each method changed in the weights (stage updates): per layer type,
full fine-tuning's effective rank beside LoRA's r and its update's measured rank, each method's
intruder dimensions and the update's size (its picture, per matrix against depth, is
ftstudy.report.figures.updates_by_depth); and a finding that puts them beside the forgetting compare
measured, with no causal claim."""

from __future__ import annotations

from pathlib import Path

from ftstudy.report import task_report
from ftstudy.report.findings import retained

METHODS = ("full", "lora")


def _row(label: str, s: dict, r: int) -> list[str]:
    full, lora = s["full"], s["lora"]
    return [label, str(full["matrices"]), f"{full['effective_rank']:.1f}", f"{r} / {lora['rank']:.1f}",
            f"{lora['effective_rank']:.1f}", f"{full['intruders']} ({full['intruders_per_matrix']:.2f})",
            f"{lora['intruders']} ({lora['intruders_per_matrix']:.2f})", f"{full['relative_norm']:.3f}",
            f"{lora['relative_norm']:.3f}"]


def section(updates: dict, labels: dict, picture: list[str]) -> list[str]:
    """`updates`: stage updates' metrics and info ({} when absent: no section)."""
    if not updates:
        return []
    s, info = updates, updates["info"]
    types = sorted(s["full"]["by_type"])
    rows = [_row(t, {m: s[m]["by_type"][t] for m in METHODS}, info["lora_r"]) for t in types]
    if len(types) > 1:
        rows.append(_row("all", s, info["lora_r"]))
    widest = max(min(row["shape"]) for row in info["layers"])
    return ["## What each method changed in the weights", "",
            task_report.table(rows, ["Layer type", "Matrices", "Full: effective rank", "LoRA: r / measured rank",
                                     "LoRA: effective rank", "Intruders: full (per matrix)",
                                     "Intruders: LoRA (per matrix)", "‖ΔW‖/‖W‖ full", "‖ΔW‖/‖W‖ LoRA"]), "",
            f"At each of the {s['full']['matrices']} matrices {info['lora_variant']} wraps (at most {widest} wide "
            "here), "
            f"ΔW is the fine-tuned matrix minus the pretrained one. Its effective rank is the fewest singular values "
            f"holding {info['energy']:.0%} of its squared norm (Biderman et al. 2024), a mean over matrices; its "
            "measured rank counts the singular values above float32's noise. An intruder dimension is one of a "
            f"fine-tuned matrix's top {info['top_k']} left singular vectors whose |cosine| with every pretrained one "
            f"stays below {info['epsilon']} (Shuttleworth et al. 2024). LoRA is measured against "
            f"{info['lora_base']}; matrices are taken out × in{_fused(info['layers'])}.", "", *picture]


FUSED = ("c_attn", "query_key_value", "qkv_proj", "Wqkv")  # query, key and value in one matrix


def _fused(layers: list[dict]) -> str:
    """', the fused query-key-value ones (c_attn) whole' where the model has them."""
    names = sorted({row["name"].rsplit(".", 1)[-1] for row in layers} & set(FUSED))
    return f", the fused query-key-value ones ({', '.join(names)}) whole" if names else ""


def finding(updates: dict, forgetting: dict) -> list[str]:
    """Full fine-tuning's effective rank against LoRA's r, the intruders of each, and beside them
    what compare found about forgetting on the first general set: together, never as a cause."""
    if not updates:
        return []
    s, info = updates, updates["info"]
    full, lora = s["full"], s["lora"]
    text = (f"Full fine-tuning's update took an effective rank of {full['effective_rank']:.1f} on average to hold "
            f"{info['energy']:.0%} of its change, against LoRA's r of {info['lora_r']} (its update's measured rank "
            f"{lora['rank']:.1f}); LoRA's matrices gained {lora['intruders']} intruder dimensions "
            f"({lora['intruders_per_matrix']:.2f} per matrix), full fine-tuning's {full['intruders']}")
    if forgetting:  # compare's call, as the forgetting finding makes it
        name, pairs = next(iter(forgetting.items()))
        kept = {"too few": "no call on forgetting was made (too few units)",
                "none": "neither method forgot measurably", "lora": "LoRA retained more of the general text",
                "full": "full fine-tuning retained more of the general text",
                "tie": "which method retained more of the general text is within its paired interval"}[retained(pairs)]
        text += f". Beside them, on {name} {kept}"
    return [text + ". One run: these go together here, and nothing in it shows that one causes the other."]
