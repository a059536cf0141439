"""The prompt panel: seeded, reproducible generation and token-level text quality."""

import pytest
import torch

from conftest import TINY_MODEL, demo_params
from ftstudy import modeling
from ftstudy.config import ConfigError, parse_params
from ftstudy.measure import generation

# Prompts of one's own (the demo prompts with generate.prompt auto: held-out openings).
PANEL = {"generate.prompt": "The town of", "generate.extra_prompts": ["The river", "In 1840 , the ship"]}


def test_same_seed_same_text_and_samples_differ():
    g = parse_params(demo_params(**PANEL, **{"generate.num_samples": 2, "generate.max_new_tokens": 20})).generate
    model = modeling.load_for_eval(TINY_MODEL, TINY_MODEL, str(TINY_MODEL))
    tok = modeling.load_tokenizer(TINY_MODEL)
    with torch.no_grad():
        a, ids = generation.generate(model, tok, g, seed=7, device=torch.device("cpu"))
        b, _ = generation.generate(model, tok, g, seed=7, device=torch.device("cpu"))
        c, _ = generation.generate(model, tok, g, seed=8, device=torch.device("cpu"))
    assert a == b
    assert [p["prompt"] for p in a] == ["The town of", "The river", "In 1840 , the ship"]
    assert all(len(p["samples"]) == 2 for p in a) and len(ids) == 3 * 3
    assert [p["greedy"] for p in a] == [p["greedy"] for p in c]
    assert [p["samples"] for p in a] != [p["samples"] for p in c]
    assert tok.decode(ids[0], skip_special_tokens=True) == a[0]["greedy"] and len(ids[0]) > 5


def test_temperature_zero_is_greedy_and_counted_once():
    g = parse_params(demo_params(**PANEL, **{"generate.temperature": 0.0, "generate.max_new_tokens": 8})).generate
    assert g.num_samples == 2
    model = modeling.load_for_eval(TINY_MODEL, TINY_MODEL, str(TINY_MODEL))
    with torch.no_grad():
        panel, ids = generation.generate(model, modeling.load_tokenizer(TINY_MODEL), g, 0, torch.device("cpu"))
    assert all(p["samples"] == [] for p in panel)  # a "sample" at temperature 0 would be the greedy text
    assert len(ids) == len(panel) == 3


def test_a_sample_that_repeats_the_greedy_text_counts_once():
    g = parse_params(demo_params(**PANEL, **{"generate.top_k": 1, "generate.max_new_tokens": 8})).generate  # top-1: greedy
    model = modeling.load_for_eval(TINY_MODEL, TINY_MODEL, str(TINY_MODEL))
    with torch.no_grad():
        panel, ids = generation.generate(model, modeling.load_tokenizer(TINY_MODEL), g, 0, torch.device("cpu"))
    assert all(p["samples"] == [p["greedy"]] * 2 for p in panel)  # shown as generated...
    assert len(ids) == 3  # ...but each prompt's one distinct continuation is scored once
    assert generation.text_quality(ids, 0)["texts"] == 3


def test_a_prompt_without_room_in_the_context_is_refused_naming_the_key():
    generation.check_room({"The town of": 3}, 125, 128)  # fits exactly
    with pytest.raises(ConfigError, match=r"generate.max_new_tokens: 126 new tokens after the 3-token prompt "
                                          r"'The town of' exceed the model's context \(128 tokens\); set it to at most 125"):
        generation.check_room({"The town of": 3, "x": 1}, 126, 128)


def test_text_quality_metrics():
    eos = 0
    q = generation.text_quality([[5, 6, 7, 8, 5, 6, 7, 8, 9], [1, 2, 3, eos, 4, 4]], eos)
    # The second text stops at EOS after 3 tokens; what follows EOS does not count.
    assert q["mean_length"] == (9 + 3) / 2 and q["eos_rate"] == 0.5
    assert q["distinct_1"] == pytest.approx(8 / 12)          # {5,6,7,8,9,1,2,3} over 12 tokens
    assert q["distinct_2"] == pytest.approx(7 / 10)          # {56 67 78 85 89 12 23} of 8 + 2 bigrams
    assert q["repetition_4gram"] == pytest.approx(1 / 6)     # 5678 comes back once among 6 4-grams
    assert generation.text_quality([], eos)["texts"] == 0


def test_auto_prompts_are_openings_of_held_out_test_documents(project, tmp_path):
    """Own data is prompted with its own held-out text (the Python docs once got "The town of")."""
    import json

    from conftest import prepare_in, run_main
    from ftstudy.outputs import read_json
    from stages import generate

    docs = [f"Module number {i} provides functions for parsing and formatting things. " * 2 for i in range(200)]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    prepare_in(project, **{"data.name": str(tmp_path / "docs.jsonl"), "generate.prompt": "auto",
                           "generate.extra_prompts": [], "generate.test_prompts": 2, "generate.max_new_tokens": 5,
                           "generate.num_samples": 0})
    run_main(generate, "--model", "pre", "--base", "pre", "--data", "prep", "--out", "gen", "--metrics", "m/generate")
    prompts = [p["prompt"] for p in read_json("gen/pre.json")["prompts"]]
    test = modeling.load_tokenizer(TINY_MODEL).decode(__import__("ftstudy.data.token_files", fromlist=["x"]).load_tokens("prep", "test"))
    assert len(prompts) == 2 and all(p.startswith("Module number ") and p in " ".join(test.split()) for p in prompts)
    # Drawn by data.split_seed, not the training seed: every seed's models open the same documents.
    tok, meta = modeling.load_tokenizer("pre"), read_json("prep/meta.json")
    by_seed = [generate.panel_prompts(parse_params(demo_params(**{"seed": seed, "generate.test_prompts": 2})), "prep",
                                      meta, tok, None, []) for seed in (1, 2)]
    assert by_seed[0] == by_seed[1] and len(by_seed[0]) == 2
    other = parse_params(demo_params(**{"data.split_seed": 7, "generate.test_prompts": 2}))
    assert generate.panel_prompts(other, "prep", meta, tok, None, []) != by_seed[0]


def test_the_held_out_draw_follows_the_split_seed_and_leaves_out_cut_references():
    drawn = generation.heldout(30, 5, 42)
    assert drawn == sorted(drawn) and len(set(drawn)) == 5 and drawn != generation.heldout(30, 5, 43)
    cut = [drawn[0], drawn[3], 7]
    assert not set(generation.heldout(30, 5, 42, cut)) & set(cut) and len(generation.heldout(30, 5, 42, cut)) == 5
    assert generation.heldout(30, 100, 42, cut) == sorted(set(range(30)) - set(cut))  # all of them when fewer
    assert generation.heldout(3, 2, 42, [0, 1, 2]) == []


def test_chat_prompts_read_without_glued_role_names_and_answers_stop_at_the_end_of_turn(tmp_path):
    from ftstudy.synthetic import write_tiny_model

    write_tiny_model("llama", tmp_path / "llama")
    tok = modeling.load_tokenizer(tmp_path / "llama")
    ids = tok.apply_chat_template([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "How many?"}],
                                  tokenize=True, add_generation_prompt=True, return_dict=False)
    assert generation.readable_prompt(tok, ids) == "system: Be brief. / user: How many?"
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    assert eot in generation.stop_ids(tok) and tok.eos_token_id in generation.stop_ids(tok)
    gpt2 = modeling.load_tokenizer(TINY_MODEL)
    assert generation.stop_ids(gpt2) == [gpt2.eos_token_id]
    assert generation.readable_prompt(gpt2, gpt2("The town of")["input_ids"]) == "The town of"


class ShortAnswers:
    """Held-out examples as answer_heldout reads them (ex.example(i)[0], ex.last_answer(i)): prompts of
    different lengths, each followed by a short reference, so that batches mix lengths within the
    tiny model's 128-token context."""

    def __init__(self, tok, texts):
        self.rows = [tok(prompt)["input_ids"] + tok(answer)["input_ids"] for prompt, answer in texts]
        self.starts = [len(tok(prompt)["input_ids"]) for prompt, _ in texts]

    def example(self, i):
        return torch.tensor(self.rows[i]), None

    def last_answer(self, i):
        return self.starts[i], len(self.rows[i])


def test_held_out_answers_left_padded_in_batches_equal_those_one_at_a_time():
    model = modeling.load_for_eval(TINY_MODEL, TINY_MODEL, str(TINY_MODEL))
    tok = modeling.load_tokenizer(TINY_MODEL)
    texts = [("The town of", " Dunvin is"), ("= Sulalwen = Historians such as Tharard have", " described the"),
             ("The river", " Sulthar is 29 km"), ("= Ardesetor = The town holds a market every", " day ."),
             ("Its main tributary , the", " Dunese"), ("The name Tharcor is derived from the old word for", " the")]
    ex = ShortAnswers(tok, texts)
    indices = list(range(len(texts)))
    lengths = [ex.starts[i] for i in indices]
    rooms = [generation.answer_room(*ex.last_answer(i), 128) for i in indices]
    batches = generation._batches(sorted(indices, key=lengths.__getitem__), lengths, rooms, 4, 128)
    assert any(len({lengths[k] for k in batch}) > 1 for batch in batches)  # left padding is exercised
    with torch.no_grad():
        one, four = (generation.answer_heldout(model, tok, ex, indices, 128, torch.device("cpu"), size)
                     for size in (1, 4))
    assert [a["answer"] for a in four] == [a["answer"] for a in one]
    assert [a["example"] for a in four] == indices and len({a["answer"] for a in one}) > 1
