"""What each method changed in the weights (ftstudy.measure.updates): known cases on synthetic
matrices, GPT-2's Conv1D against the equivalent nn.Linear, and the null case on the demo: full
fine-tuning at a learning rate of 1e-6 gains no intruder dimension."""

import pytest
import torch

from conftest import PREPARE_ARGS, ROOT, run_main, train_args
from ftstudy.measure import updates
from ftstudy.synthetic import demo_overrides, local_params, write_params

K, EPS = 10, 0.5


def orthonormal(n: int, seed: int) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))[0]


def pretrained(n: int = 64, seed: int = 0) -> torch.Tensor:
    """A full-rank n x n matrix with singular values spread from 1 down to 0.1."""
    u, v = orthonormal(n, seed), orthonormal(n, seed + 1)
    return (u * torch.linspace(1, 0.1, n, dtype=torch.float64)) @ v.T


def test_a_rank_one_update_along_a_new_direction_is_exactly_one_intruder():
    w = pretrained()
    u_pre = updates.left_vectors(w)
    # A unit direction spread evenly over every pretrained left singular vector: |cosine| 1/8 with each.
    new = u_pre.sum(dim=1) / 8
    right = orthonormal(64, 5)[:, 0]
    tuned = w + 2.0 * torch.outer(new, right)  # large enough to lead the fine-tuned spectrum
    assert updates.intruders(u_pre, tuned, K, EPS) == 1
    numbers, values = updates.update_numbers(w, tuned, 0.9, K, EPS)
    assert numbers["intruders"] == 1 and numbers["rank"] == 1 and numbers["effective_rank"] == 1
    assert values[0] == pytest.approx(2.0) and numbers["relative_norm"] == pytest.approx(2.0 / float(w.norm()))


def test_a_small_random_perturbation_has_no_intruder():
    w = pretrained()
    noise = 1e-3 * torch.randn(64, 64, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    numbers, _ = updates.update_numbers(w, w + noise, 0.9, K, EPS)
    assert numbers["intruders"] == 0
    assert numbers["effective_rank"] > 25  # noise is high-rank: 90% of it takes about half of the 64 directions


@pytest.mark.parametrize("r", [1, 4, 8])
def test_the_effective_rank_of_an_update_of_known_rank(r):
    u, v = orthonormal(64, 7)[:, :r], orthonormal(64, 8)[:, :r]
    # Singular values with the r-th squared one above 10% of their sum: 90% needs all r of them.
    even = (u * torch.ones(r, dtype=torch.float64)) @ v.T
    assert updates.effective_rank(torch.linalg.svdvals(even), 0.9) == r
    # One dominant direction: at most r, here 1 (the others hold under 10% together).
    steep = (u * torch.tensor([10.0] + [0.5] * (r - 1), dtype=torch.float64)) @ v.T
    assert updates.effective_rank(torch.linalg.svdvals(steep), 0.9) == 1
    assert updates.measured_rank(torch.linalg.svdvals(steep.float()), (64, 64)) == r
    assert updates.effective_rank(torch.zeros(5), 0.9) == 0


def test_gpt2s_conv1d_and_the_equivalent_linear_give_the_same_numbers():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    conv, conv_tuned = Conv1D(96, 32), Conv1D(96, 32)  # nf=96 outputs, nx=32 inputs: weight 32 x 96 (in x out)
    lin, lin_tuned = torch.nn.Linear(32, 96), torch.nn.Linear(32, 96)
    conv_tuned.weight.data = conv.weight.data + 0.5 * torch.randn(32, 1) @ torch.randn(1, 96)
    lin.weight.data, lin_tuned.weight.data = conv.weight.data.T.clone(), conv_tuned.weight.data.T.clone()
    x = torch.randn(3, 32)
    torch.testing.assert_close(conv(x) - conv.bias, lin(x) - lin.bias)  # the same map
    a, _ = updates.update_numbers(updates.as_matrix(conv), updates.as_matrix(conv_tuned), 0.9, K, EPS)
    b, _ = updates.update_numbers(updates.as_matrix(lin), updates.as_matrix(lin_tuned), 0.9, K, EPS)
    assert updates.as_matrix(conv).shape == (96, 32)
    assert a == pytest.approx(b)


def test_layer_types_and_depths_from_module_names():
    assert [updates.layer_type(n) for n in ("transformer.h.3.attn.c_attn", "transformer.h.3.mlp.c_proj",
                                             "model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj",
                                             "gpt_neox.layers.1.mlp.dense_h_to_4h", "model.layers.2.self_attn.dense",
                                             "lm_head")] == ["attention", "mlp", "attention", "mlp", "mlp",
                                                             "attention", "other"]
    assert [updates.depth(n) for n in ("transformer.h.11.attn.c_attn", "model.layers.0.mlp.up_proj", "lm_head")] \
        == [11, 0, None]


@pytest.mark.slow
def test_full_fine_tuning_at_a_tiny_rate_gains_no_intruder_on_the_demo(tmp_path, monkeypatch):
    """The demo's model, data and schedule (2 epochs), full fine-tuning at lr 1e-6: its matrices are
    only 64 wide, where random directions come closer to epsilon than at 768, and still none of
    its top 10 singular vectors is new."""
    from ftstudy import modeling
    from ftstudy.train import lora
    from stages import prepare, train_full

    monkeypatch.chdir(tmp_path)
    demo = demo_overrides()
    write_params(tmp_path, local_params(ROOT / demo["model.name"], ROOT / demo["data.name"], **{
        k: v for k, v in demo.items() if k.startswith(("train.", "data.block_size", "evaluate."))} | {"full.lr": 1e-6}))
    run_main(prepare, *PREPARE_ARGS)
    run_main(train_full, *train_args("full"))
    before, after = modeling.load_causal_lm("pre"), modeling.load_causal_lm("models/full")
    names = sorted(lora.targets(before, lora.resolve_targets(before, "all-linear")))
    pre, tuned = updates.matrices(before, names), updates.matrices(after, names)
    numbers, _ = updates.measure_method(pre, {n: updates.left_vectors(w) for n, w in pre.items()}, tuned, 0.9, K, EPS)
    assert len(numbers) == 8 and all(max(w.shape) <= 256 and min(w.shape) == 64 for w in pre.values())
    assert sum(n["relative_norm"] for n in numbers.values()) > 0  # it did train
    assert {name: n["intruders"] for name, n in numbers.items() if n["intruders"]} == {}


def test_the_finding_sets_the_updates_beside_compares_forgetting_call_and_claims_no_cause():
    from ftstudy.report import update_report

    numbers = {"matrices": 8, "effective_rank": 27.75, "rank": 8.0, "intruders": 37, "intruders_per_matrix": 4.625}
    updates_ = {"full": numbers | {"intruders": 1, "intruders_per_matrix": 0.125, "rank": 64.0},
                "lora": numbers | {"effective_rank": 6.4}, "info": {"energy": 0.9, "lora_r": 8}}

    def pair(ratio, lo, hi):
        return {"ratio": ratio, "lo": lo, "hi": hi, "unit": "chunks"}

    forgot = {"g": {"full_vs_pretrained": pair(4.0, 3.9, 4.1), "lora_vs_pretrained": pair(2.2, 2.1, 2.3),
                    "full_vs_lora": pair(1.8, 1.7, 1.9)}}
    text = update_report.finding(updates_, forgot)[0]
    assert text.startswith("Full fine-tuning's update took an effective rank of 27.8 on average to hold 90% of its "
                           "change, against LoRA's r of 8 (its update's measured rank 8.0); LoRA's matrices gained 37 "
                           "intruder dimensions (4.62 per matrix), full fine-tuning's 1.")
    assert "on g LoRA retained more of the general text" in text and "nothing in it shows that one causes" in text
    # Both improved on general text: no method "retained more", whatever their ratio to each other.
    better = {"g": {"full_vs_pretrained": pair(0.9, 0.85, 0.95), "lora_vs_pretrained": pair(0.8, 0.75, 0.85),
                    "full_vs_lora": pair(1.12, 1.05, 1.2)}}
    assert "on g neither method forgot measurably" in update_report.finding(updates_, better)[0]
    assert update_report.finding({}, forgot) == []
