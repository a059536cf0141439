import torch

from conftest import TINY_MODEL, demo_params
from stages import generate, modeling
from stages.config import parse_params


def test_same_seed_same_text_and_samples_differ():
    g = parse_params(demo_params(**{"generate.num_samples": 2, "generate.max_new_tokens": 20})).generate
    model = modeling.load_for_eval(TINY_MODEL, TINY_MODEL, str(TINY_MODEL))
    tok = modeling.load_tokenizer(TINY_MODEL)
    with torch.no_grad():
        a, ids = generate.generate(model, tok, g, seed=7, device=torch.device("cpu"))
        b, _ = generate.generate(model, tok, g, seed=7, device=torch.device("cpu"))
        c, _ = generate.generate(model, tok, g, seed=8, device=torch.device("cpu"))
    assert a == b
    assert [p["prompt"] for p in a] == ["The town of", "The river", "In 1840 , the ship"]
    assert all(len(p["samples"]) == 2 for p in a) and len(ids) == 3 * 3
    assert [p["greedy"] for p in a] == [p["greedy"] for p in c]
    assert [p["samples"] for p in a] != [p["samples"] for p in c]
    assert tok.decode(ids[0], skip_special_tokens=True) == a[0]["greedy"] and len(ids[0]) > 5
