"""Stage updates: the three models -> what each method changed, per layer LoRA wraps
(ftstudy.measure.updates): each update's singular values, full fine-tuning's effective rank beside
LoRA's measured one, each fine-tuned matrix's intruder dimensions and the update's size relative
to the pre-trained weight.

The layers are lora.target_modules as train_lora resolves them, read in the pretrained, the fully
fine-tuned and the LoRA model (merged in memory), one model at a time. A LoRA trained on a 4-bit
base (lora.quantize: nf4) is measured against that base as it trained, dequantized, and the info
says so; full fine-tuning always against the full-precision one. The summary per method, over all
layers and per layer type, goes to --out (a DVC metric); each layer's numbers, with its name, type,
depth and shape, to --info; each update's singular values to --values (.npz, '<method>/<layer>').
"""

from __future__ import annotations

import argparse
import time

import torch

from ftstudy import modeling, runtime
from ftstudy.config import load_params
from ftstudy.errors import run_stage
from ftstudy.measure import updates
from ftstudy.outputs import write_arrays, write_json
from ftstudy.train import lora


def main() -> None:
    ap = argparse.ArgumentParser(description="Measure each method's weight update; run by dvc.yaml stage updates")
    ap.add_argument("--base", required=True, help="pretrained snapshot")
    ap.add_argument("--full", required=True, help="the fully fine-tuned model folder")
    ap.add_argument("--lora", required=True, help="the LoRA model folder (a PEFT adapter or a merged model)")
    ap.add_argument("--out", required=True, help="metrics JSON to write")
    ap.add_argument("--info", required=True, help="per-layer JSON to write")
    ap.add_argument("--values", required=True, help="each update's singular values (.npz) to write")
    args = ap.parse_args()
    p = load_params()
    u = p.updates
    four_bit = p.lora.quantize == "nf4"
    modeling.leave_out_bitsandbytes(args.base, needed=four_bit)
    t0 = time.perf_counter()
    model, device = runtime.to_eval_device(modeling.load_causal_lm(args.base), p.train.cpu_threads)
    names = sorted(lora.targets(model, lora.resolve_targets(model, p.lora.target_modules)))
    pretrained = updates.matrices(model, names, device)
    del model
    vectors = {n: updates.left_vectors(w) for n, w in pretrained.items()}
    base = updates.dequantized_4bit(args.base, names, device) if four_bit else None

    def merged():
        m = modeling.load_for_eval(args.lora, args.base, p.model.name)
        return m.merge_and_unload() if modeling.is_adapter(args.lora) else m

    numbers, values = {}, {}
    for method, load in (("full", lambda: modeling.load_causal_lm(args.full)), ("lora", merged)):
        with torch.no_grad():
            fine_tuned = updates.matrices(load(), names, device)
            numbers[method], by_layer = updates.measure_method(pretrained, vectors, fine_tuned, u.energy, u.top_k,
                                                               u.epsilon, base if method == "lora" else None)
        values |= {f"{method}/{n}": v.numpy() for n, v in by_layer.items()}
    rows = updates.layer_rows(pretrained, numbers)
    summary = updates.summary(rows, ("full", "lora"))
    seconds = time.perf_counter() - t0
    write_arrays(args.values, values)
    write_json(args.info, {"layers": rows, "seconds": round(seconds, 3), "energy": u.energy, "top_k": u.top_k,
                           "epsilon": u.epsilon, "lora_r": p.lora.r, "lora_variant": lora.variant(p.lora),
                           "lora_base": _lora_base(p.lora) if four_bit else "the full-precision base",
                           "layout": "out x in (Conv1D transposed); a fused query-key-value layer as one matrix",
                           "device": runtime.device_name(device)})
    write_json(args.out, {"updates": summary})
    f, lo = summary["full"], summary["lora"]
    print(f"updates: {len(rows)} matrices in {seconds:.1f} s; full fine-tuning's effective rank "
          f"{f['effective_rank']:.1f} on average (LoRA's r {p.lora.r}, its update's measured rank {lo['rank']:.1f}), "
          f"intruder dimensions: full {f['intruders']}, LoRA {lo['intruders']}; wrote {args.out}, {args.info}, "
          f"{args.values}")


def _lora_base(p_lora) -> str:
    """What LoRA on a 4-bit base is measured against. Its update is merged on the full-precision base and
    added to the dequantized one: exact for plain LoRA (B A), not for DoRA (its magnitude rescales by the
    base's column norms) nor a PiSSA or OLoRA init (the 4-bit base that trained was their residual)."""
    text = "the 4-bit (nf4) base it trained against, dequantized"
    if p_lora.use_dora or lora.reshapes_base(p_lora):
        text += (" (with its update as merged on the full-precision base: an approximation for DoRA and for a "
                 "PiSSA or OLoRA init)")
    return text


if __name__ == "__main__":
    run_stage(main)
