import torch

from conftest import TINY_MODEL, demo_params
from stages import generate, modeling
from stages.config import parse_params


def test_same_seed_same_text_and_samples_differ():
    g = parse_params(demo_params(**{"generate.num_samples": 2, "generate.max_new_tokens": 20})).generate
    model = modeling.load_for_eval(TINY_MODEL, TINY_MODEL, str(TINY_MODEL))
    tok = modeling.load_tokenizer(TINY_MODEL)
    with torch.no_grad():
        a = generate.generate(model, tok, g, seed=7, device=torch.device("cpu"))
        b = generate.generate(model, tok, g, seed=7, device=torch.device("cpu"))
        c = generate.generate(model, tok, g, seed=8, device=torch.device("cpu"))
    assert a == b
    assert a["prompt"] == "The town of" and len(a["samples"]) == 2
    assert a["greedy"] == c["greedy"] and a["samples"] != c["samples"]
    assert len(tok(a["greedy"])["input_ids"]) > 5
