"""What each method changed in the weights, per matrix LoRA wraps: the spectrum of the update, its
effective rank, and the fine-tuned matrix's intruder dimensions (docs/measurement.md, "What the
updates look like").

- The update is ΔW = W_fine-tuned − W_pretrained, in the math layout (out × in): GPT-2's `Conv1D`
  stores in × out, and is transposed first, so that it and the equivalent `nn.Linear` give the same
  numbers. GPT-2's fused `c_attn` (query, key and value) is one matrix, as LoRA wraps it and as
  PEFT counts it: it is not split.
- Its effective rank (Biderman et al., "LoRA Learns Less and Forgets Less", TMLR 2024) is the
  smallest k whose k largest squared singular values hold `energy` (0.9) of ΔW's squared Frobenius
  norm. Its measured rank counts the singular values above float32's noise: LoRA's is r, DoRA's is
  not (its magnitude rescales whole columns), and so on; the report shows the measured one.
- A fine-tuned matrix's intruder dimensions (Shuttleworth et al., "LoRA vs Full Fine-tuning: An
  Illusion of Equivalence", arXiv 2410.21228) are those of its `top_k` leading left singular
  vectors whose largest |cosine| with every left singular vector of the pre-trained matrix stays
  below `epsilon`. PEFT's `reduce_intruder_dimension` detects them the same way, on the layer's
  stored weight: for `nn.Linear` that is this layout and the counts agree; for GPT-2's `Conv1D` its
  left singular vectors are the input side's (tests/test_families.py checks both).
- The update's size is its Frobenius norm over the pre-trained matrix's.

About five SVDs a matrix (the pre-trained matrix, each fine-tuned one, each update), in float32 on
the device the models are on.
"""

from __future__ import annotations

import re

import torch

ATTENTION = ("attn", "attention", "q_proj", "k_proj", "v_proj", "o_proj", "query", "key", "value", "qkv", "dense")
MLP = ("mlp", "c_fc", "fc1", "fc2", "gate_proj", "up_proj", "down_proj", "dense_h_to_4h", "dense_4h_to_h")


def as_matrix(module: torch.nn.Module) -> torch.Tensor:
    """A layer's weight as out × in, in float32 (GPT-2's Conv1D stores in × out)."""
    from transformers.pytorch_utils import Conv1D

    weight = module.weight.detach().float()
    return weight.T if isinstance(module, Conv1D) else weight


def layer_type(name: str) -> str:
    """'attention', 'mlp' or 'other', from a module's dotted name (the last part that says)."""
    for part in reversed(name.split(".")):
        if any(k in part for k in MLP):
            return "mlp"
        if any(k in part for k in ATTENTION):
            return "attention"
    return "other"


def depth(name: str) -> int | None:
    """The block a module sits in: the first number in its dotted name ('transformer.h.3.attn' -> 3)."""
    found = re.search(r"(?:^|\.)(\d+)(?:\.|$)", name)
    return int(found[1]) if found else None


def effective_rank(singular_values: torch.Tensor, energy: float) -> int:
    """The smallest k whose k largest squared singular values hold `energy` of their sum (0 for a zero update)."""
    power = singular_values.double() ** 2
    total = float(power.sum())
    if total == 0:
        return 0
    held = torch.cumsum(power, 0) / total
    return int(torch.searchsorted(held, torch.tensor(energy, dtype=held.dtype) - 1e-12)) + 1


def measured_rank(singular_values: torch.Tensor, shape: tuple[int, int]) -> int:
    """Singular values above float32's noise for a matrix of this shape (numpy's matrix_rank rule)."""
    if singular_values.numel() == 0 or float(singular_values[0]) == 0:
        return 0
    tol = float(singular_values[0]) * max(shape) * torch.finfo(torch.float32).eps
    return int((singular_values > tol).sum())


def left_vectors(matrix: torch.Tensor) -> torch.Tensor:
    """The left singular vectors (columns), leading first. A wide matrix is decomposed transposed
    (its left vectors are then the right ones): the same vectors, and LAPACK is 3x faster on tall ones."""
    if matrix.shape[0] < matrix.shape[1]:
        return torch.linalg.svd(matrix.T, full_matrices=False)[2].T
    return torch.linalg.svd(matrix, full_matrices=False)[0]


def singular_values(matrix: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(matrix.T if matrix.shape[0] < matrix.shape[1] else matrix)


def intruders(pretrained_vectors: torch.Tensor, fine_tuned: torch.Tensor, top_k: int, epsilon: float) -> int:
    """How many of the fine-tuned matrix's `top_k` leading left singular vectors have a largest
    |cosine| below `epsilon` with every pre-trained left singular vector (`pretrained_vectors`,
    columns). Singular vectors have unit norm, so the cosine is their dot product."""
    leading = left_vectors(fine_tuned)[:, :top_k]
    best = (leading.T @ pretrained_vectors).abs().max(dim=1).values
    return int((best < epsilon).sum())


def update_numbers(pretrained: torch.Tensor, fine_tuned: torch.Tensor, energy: float, top_k: int, epsilon: float,
                   pretrained_vectors: torch.Tensor | None = None) -> tuple[dict, torch.Tensor]:
    """One method's numbers at one matrix (both out × in) and its update's singular values."""
    if pretrained_vectors is None:
        pretrained_vectors = left_vectors(pretrained)
    delta = fine_tuned - pretrained
    values = singular_values(delta)
    norm = float(torch.linalg.matrix_norm(pretrained))
    return {"effective_rank": effective_rank(values, energy), "rank": measured_rank(values, tuple(delta.shape)),
            "intruders": intruders(pretrained_vectors, fine_tuned, top_k, epsilon),
            "relative_norm": float(torch.linalg.matrix_norm(delta)) / norm if norm else 0.0}, values.cpu()


def matrices(model: torch.nn.Module, names: list[str], device: torch.device | None = None) -> dict[str, torch.Tensor]:
    """The named layers' weights, out × in, in float32 (on `device`)."""
    return {n: as_matrix(model.get_submodule(n)).to(device) for n in names}


def measure_method(pretrained: dict[str, torch.Tensor], vectors: dict[str, torch.Tensor],
                   fine_tuned: dict[str, torch.Tensor], energy: float, top_k: int, epsilon: float,
                   base: dict[str, torch.Tensor] | None = None) -> tuple[dict[str, dict], dict[str, torch.Tensor]]:
    """One method's numbers and update singular values per layer (name -> out × in matrix).
    `vectors` are the pre-trained matrices' left singular vectors. `base`, where the method trained
    against other pre-trained weights than `pretrained` (a 4-bit base, dequantized): its update
    (fine-tuned − pretrained, as merged on the full-precision weights) is applied to that base, and
    measured against it."""
    numbers, values = {}, {}
    for name, w in pretrained.items():
        if base is None:
            numbers[name], values[name] = update_numbers(w, fine_tuned[name], energy, top_k, epsilon, vectors[name])
        else:
            numbers[name], values[name] = update_numbers(base[name], base[name] + (fine_tuned[name] - w), energy,
                                                         top_k, epsilon)
    return numbers, values


def layer_rows(pretrained: dict[str, torch.Tensor], by_method: dict[str, dict[str, dict]]) -> list[dict]:
    """Per layer: {name, type, depth, shape, <method>: its numbers}."""
    return [{"name": n, "type": layer_type(n), "depth": depth(n), "shape": list(w.shape)}
            | {m: numbers[n] for m, numbers in by_method.items()} for n, w in pretrained.items()]


def summary(rows: list[dict], methods: tuple[str, ...]) -> dict:
    """Per method, over all layers and per layer type: the mean effective rank, measured rank and
    relative norm, and the intruders' total and mean per matrix."""
    def over(subset: list[dict], method: str) -> dict:
        n = len(subset)
        nums = [r[method] for r in subset]
        return {"matrices": n, "effective_rank": sum(x["effective_rank"] for x in nums) / n,
                "rank": sum(x["rank"] for x in nums) / n, "intruders": sum(x["intruders"] for x in nums),
                "intruders_per_matrix": sum(x["intruders"] for x in nums) / n,
                "relative_norm": sum(x["relative_norm"] for x in nums) / n}

    out = {}
    for method in methods:
        out[method] = over(rows, method) | {"by_type": {t: over([r for r in rows if r["type"] == t], method)
                                                        for t in sorted({r["type"] for r in rows})}}
    return out


def dequantized_4bit(base_dir, names: list[str], device: torch.device | None = None) -> dict[str, torch.Tensor]:
    """The named layers of the base as LoRA trained against it under lora.quantize: nf4 (loaded in
    4-bit NormalFloat through bitsandbytes), dequantized to float32, out × in."""
    import bitsandbytes.functional as bnb

    from ftstudy import modeling

    model = modeling.load_causal_lm(base_dir, quantize="nf4")
    out = {}
    for name in names:
        module = model.get_submodule(name)
        weight = module.weight
        state = getattr(weight, "quant_state", None)
        matrix = bnb.dequantize_4bit(weight.data, state) if state is not None else as_matrix(module)
        out[name] = matrix.float().to(device)
    return out
