"""Both perplexity protocols against a brute-force, one-prediction-at-a-time computation."""

import json
import math
import re

import numpy as np
import pytest
import torch

from conftest import ROOT, TINY_MODEL, TINY_WIKI, prepare_in, run_main, run_tasks, train_args
from ftstudy import modeling
from ftstudy.config import ConfigError, load_params
from ftstudy.data import token_files
from ftstudy.measure import scoring, stats
from ftstudy.outputs import read_json
from test_loss import ScaledBeforeHead

# One pytest-xdist worker runs this file: its module-scoped fixtures are built once.
pytestmark = pytest.mark.xdist_group("scoring")


@pytest.fixture(scope="module")
def model_and_tokens():
    tok = modeling.load_tokenizer(TINY_MODEL)
    model = modeling.load_causal_lm(TINY_MODEL).eval()
    ids = tok((TINY_WIKI / "wiki.test.raw").read_text(encoding="utf-8"))["input_ids"]
    return model, np.array(ids[:150], dtype=np.uint16)


@torch.no_grad()
def logprob(model, context: np.ndarray, target: int) -> float:
    x = torch.tensor(context, dtype=torch.long)[None]
    return torch.log_softmax(model(input_ids=x).logits[0, -1].double(), -1)[target].item()


@pytest.mark.parametrize("block,stride", [(32, 8), (32, 32), (32, 31), (128, 16)])
def test_sliding_window_matches_brute_force(model_and_tokens, block, stride):
    model, tokens = model_and_tokens
    # Independent definition: token t is predicted from up to block-1 tokens before it, where the
    # window that scores it starts; windows advance by min(stride, block-1) once the first is full.
    step, nll = min(stride, block - 1), []
    for t in range(1, len(tokens)):
        if t < block:
            begin = 0
        else:
            k = math.ceil((t - block + 1) / step)  # windows after the first needed to reach t
            end = min(block + k * step, len(tokens))
            begin = end - block
        nll.append(-logprob(model, tokens[begin:t], int(tokens[t])))
    got = scoring.sliding_window_nll(model, tokens, block, stride, torch.device("cpu"), batch_size=3)
    assert len(got) == len(tokens) - 1
    assert stats.perplexity(got) == pytest.approx(math.exp(np.mean(nll)), rel=1e-4)
    np.testing.assert_allclose(got, nll, rtol=1e-4, atol=1e-5)


def test_blocks_match_brute_force(model_and_tokens):
    model, tokens = model_and_tokens
    block, nll = 32, []
    for b in range(len(tokens) // block):
        blk = tokens[b * block:(b + 1) * block]
        nll += [-logprob(model, blk[:j], int(blk[j])) for j in range(1, block)]
    got = scoring.block_nll(model, tokens, block, torch.device("cpu"), batch_size=2)
    assert len(got) == (len(tokens) // block) * (block - 1)
    assert stats.perplexity(got) == pytest.approx(math.exp(np.mean(nll)), rel=1e-4)


@pytest.mark.parametrize("n,block,stride", [(1000, 64, 16), (1000, 64, 64), (50, 64, 8), (64, 64, 64), (65, 64, 63), (2, 8, 1)])
def test_window_plan_predicts_every_token_but_the_first_once(n, block, stride):
    scored = []
    for begin, end, first in scoring.window_plan(n, block, stride):
        assert 0 <= begin < first <= end <= n and end - begin <= block
        scored += range(first, end)
    assert scored == list(range(1, n))


def test_bootstrap_interval_contains_the_estimate_and_shrinks_with_more_data():
    rng = np.random.default_rng(0)
    small = rng.gamma(2.0, 1.0, size=2_000)
    large = rng.gamma(2.0, 1.0, size=50_000)
    widths = []
    for nll in (small, large):
        m = stats.ppl_metrics(nll, chunk=100, samples=1000, seed=1)
        assert m["ppl_lo"] < stats.perplexity(nll) < m["ppl_hi"] and m["chunks"] == len(nll) // 100
        widths.append(m["ppl_hi"] - m["ppl_lo"])
    assert widths[1] < widths[0] / 3  # ~ 1/sqrt(25) of the width
    assert stats.ppl_metrics(small, 100, 1000, 1) == stats.ppl_metrics(small, 100, 1000, 1)


def test_too_few_chunks_give_no_interval():
    # 1,500 tokens at the shipped 1,024-token chunk: one chunk, where every resample is the same and
    # the old "interval" had zero width (ratio 0.977, [0.977, 0.977]: a false winner).
    rng = np.random.default_rng(0)
    a, b = rng.gamma(2.0, 1.0, size=1_500), rng.gamma(2.0, 1.0, size=1_500)
    assert stats.paired_ppl_ratio(a, b, 1024, 1000, 1).keys() == {"ratio", "chunks"}
    assert stats.ppl_metrics(a, 1024, 1000, 1).keys() == {"ppl", "chunks"}
    just = stats.MIN_CHUNKS * 50  # 1,000 tokens in chunks of 50
    assert "lo" not in stats.paired_ppl_ratio(a[:just - 1], b[:just - 1], 50, 1000, 1)
    assert "lo" in stats.paired_ppl_ratio(a[:just], b[:just], 50, 1000, 1)
    assert stats.enough_tokens(1024) == stats.MIN_CHUNKS * 1024


def correlated_pair(rng, n: int, shift: float, width: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Two models' per-token NLL on the same n tokens: a shared difficulty and a model difference,
    each smoothed over `width` neighbouring tokens (losses of nearby tokens are correlated), the
    second model worse by `shift` nats on average: the true ratio is exp(shift)."""
    kernel = np.ones(width) / np.sqrt(width)
    smooth = lambda: np.convolve(rng.normal(size=n + width), kernel, mode="valid")[:n]  # noqa: E731
    shared = np.exp(0.5 * smooth()) * rng.gamma(2.0, 1.0, size=n)
    return shared + shift + 0.2 * smooth() + 0.3 * rng.normal(size=n), shared


@pytest.mark.parametrize("chunks", [stats.MIN_CHUNKS, 60])
def test_paired_interval_covers_the_true_ratio(chunks):
    """Coverage at the shipped chunk (1,024 tokens), at the minimum chunk count and above it."""
    rng, trials, shift = np.random.default_rng(0), 300, 0.02
    covered = 0
    for trial in range(trials):
        worse, base = correlated_pair(rng, chunks * 1024, shift)
        r = stats.paired_ppl_ratio(worse, base, 1024, 1000, trial)
        covered += r["lo"] <= math.exp(shift) <= r["hi"]
    assert covered / trials >= 0.90, covered / trials


def test_bits_per_byte_equals_total_nll_over_bytes_computed_independently(project):
    prepare_in(project, **{"evaluate.stride": 32})
    p = load_params()
    model = modeling.load_causal_lm(TINY_MODEL).eval()
    n_bytes = token_files.read_meta("prep")["splits"]["test"]["bytes"]
    got, _ = scoring.sliding_metrics(model, token_files.load_tokens("prep", "test"), n_bytes, 128, p.evaluate, p.seed,
                                  torch.device("cpu"))

    # Independently: tokenize the raw file, let the HF model's own loss score each window's new
    # targets (labels -100 elsewhere), and count the file's UTF-8 bytes.
    text = (TINY_WIKI / "wiki.test.raw").read_text(encoding="utf-8")
    tok = modeling.load_tokenizer(TINY_MODEL)
    ids = torch.tensor([i for row in tok(text.splitlines(keepends=True), add_special_tokens=False)["input_ids"] for i in row])
    total = count = 0.0
    for begin, end, first in scoring.window_plan(len(ids), 128, 32):
        x = ids[begin:end][None]
        labels = x.clone()
        labels[:, : first - begin] = -100
        with torch.no_grad():
            loss = model(input_ids=x, labels=labels).loss.item()
        n = end - first
        total, count = total + loss * n, count + n
    assert got["tokens"] == count == len(ids) - 1
    assert got["bpb"] == pytest.approx(total / (math.log(2) * len(text.encode("utf-8"))), rel=1e-5)
    assert got["ppl"] == pytest.approx(math.exp(total / count), rel=1e-5)
    assert got["ppl_lo"] < got["ppl"] < got["ppl_hi"]


def test_paired_ratio_of_identical_models_is_one_exactly():
    nll = np.random.default_rng(0).gamma(2.0, 1.0, size=5_000)
    assert stats.paired_ppl_ratio(nll, nll.copy(), 100, 1000, 1) == {"ratio": 1.0, "lo": 1.0, "hi": 1.0, "chunks": 50}


def test_paired_ratio_of_a_constant_shift_is_the_shift():
    nll = np.random.default_rng(0).gamma(2.0, 1.0, size=5_000)
    r = stats.paired_ppl_ratio(nll + 0.1, nll, 100, 1000, 1)
    for k in ("ratio", "lo", "hi"):
        assert r[k] == pytest.approx(math.exp(0.1), rel=1e-12)


def test_paired_interval_is_tighter_than_unpaired_for_correlated_models():
    rng = np.random.default_rng(0)
    shared = rng.gamma(2.0, 1.0, size=20_000)                  # what both models find hard or easy
    a, b = shared + rng.normal(0, 0.05, 20_000), shared + 0.02 + rng.normal(0, 0.05, 20_000)
    paired = stats.paired_ppl_ratio(b, a, 100, 1000, 1)
    assert paired["lo"] > 1.0 and paired["ratio"] == pytest.approx(math.exp(0.02), rel=2e-3)
    a_hi, b_lo = stats.ppl_metrics(a, 100, 1000, 1)["ppl_hi"], stats.ppl_metrics(b, 100, 1000, 1)["ppl_lo"]
    assert a_hi > b_lo  # separately, their intervals overlap: a tie by the old rule
    with pytest.raises(ValueError, match="same tokens"):
        stats.paired_ppl_ratio(a, b[:-1], 100, 1000, 1)


def test_evaluate_scores_through_the_models_own_forward_when_body_and_head_differ(project, monkeypatch, capsys):
    from stages import evaluate

    root = prepare_in(project)
    original = modeling.load_for_eval
    monkeypatch.setattr(modeling, "load_for_eval", lambda *a: ScaledBeforeHead(original(*a)))
    run_main(evaluate, "--model", "pre", "--base", "pre", "--data", "prep", "--out", "m/pretrained.json",
             "--info", "m/pretrained.info.json", "--nll", "nll/pretrained.npz")
    line = next(x for x in capsys.readouterr().out.splitlines() if "own forward" in x)
    assert line.startswith("evaluate@pretrained: scoring through the model's own forward (whole logits), not body + "
                           "head: on one batch its per-token NLL through body + head differs from its own forward")
    scoring_info = read_json(root / "m/pretrained.info.json")["scoring"]
    assert scoring_info["own_forward"] is True and scoring_info["path"] == "model forward"
    # The perplexity is the scaled model's own: every test token scored through its forward.
    model = ScaledBeforeHead(original("pre", "pre", "x"))
    p = load_params()
    own = scoring.sliding_window_nll(model, token_files.load_tokens("prep", "test"), 128, p.evaluate.stride,
                                     torch.device("cpu"), own_forward=True)
    assert read_json(root / "m/pretrained.json")["pretrained"]["test_ppl"] == pytest.approx(stats.perplexity(own), rel=1e-6)
    assert set(np.load(root / "nll/pretrained.npz").files) == {"test", "test_sizes", "test_unit", "tiny-general-test",
                                                               "tiny-general-test_unit"}


def test_training_refuses_the_chunked_loss_for_a_model_whose_forward_differs(project, monkeypatch):
    from stages import train_full

    prepare_in(project, **{"train.epochs": 1})
    original = train_full.build
    monkeypatch.setattr(train_full, "build", lambda *args: ScaledBeforeHead(original(*args)))
    with pytest.raises(ConfigError, match=r"^train.loss: chunked cannot train gpt2: on one batch its per-token NLL "
                                          r"through body \+ head differs.*; set train.loss: model$"):
        run_main(train_full, *train_args("full"))


def test_a_general_set_whose_label_starts_with_validation_is_kept_for_compare(project, tmp_path):
    """Its NLL was once filtered out with the validation split's by name, and the report then
    stopped with a KeyError."""
    from stages import compare, evaluate

    notes = tmp_path / "validation-notes.txt"
    notes.write_text((TINY_WIKI / "wiki.valid.raw").read_text(encoding="utf-8"))
    general = [{"name": str(notes), "revision": None, "config": None, "split": "test", "text_column": "text"}]
    root = prepare_in(project, **{"data.general": general})
    for model in ("pretrained", "full", "lora"):  # the same model three times: compare needs three files
        run_main(evaluate, "--model", "pre", "--base", "pre", "--data", "prep", "--out", f"m/evaluate/{model}.json",
                 "--info", f"m/evaluate/{model}.info.json", "--nll", f"nll/{model}.npz")
    assert {"test", "validation-notes.txt-test"} <= set(np.load(root / "nll/pretrained.npz").files)
    (root / "m/plots").mkdir(parents=True)
    for method in ("full", "lora"):
        (root / f"m/plots/train_{method}").mkdir()
        (root / f"m/plots/train_{method}/val_loss.csv").write_text("step,seconds,tokens,loss\n1,1.0,100,2.0\n")
    run_tasks(folder=".", models=("pretrained", "full", "lora"))
    (root / "gen").mkdir()
    for model in ("pretrained", "full", "lora"):  # running text: no held-out answers
        (root / f"gen/{model}.json").write_text('{"prompts": [], "heldout": []}')
    run_main(compare, "--nll", "nll", "--tasks", "task-items", "--generations", "gen", "--curves", "m/plots", "--out",
             "m/compare.json", "--info", "m/compare.info.json")
    forgetting = read_json(root / "m/compare.json")["forgetting"]
    assert "validation-notes.txt-test" in forgetting


def test_intervals_resample_documents_and_articles_and_chunks_only_without_them(project, tmp_path):
    """The bootstrap's unit is the data's independent unit: each WikiText article (at its title
    line), each record of JSON Lines; chunks of tokens only for running text without articles (the
    demo's general set). The scoring itself is unchanged: one sliding window over the text."""
    from stages import evaluate

    root = prepare_in(project)
    meta = read_json(root / "prep/meta.json")
    assert [meta["splits"][s]["units"] for s in ("validation", "test", "general-tiny-general-test")] == [
        "articles", "articles", "chunks"]
    run_main(evaluate, "--model", "pre", "--base", "pre", "--data", "prep", "--out", "m/pretrained.json",
             "--info", "m/pretrained.info.json", "--nll", "nll/pretrained.npz")
    kept = np.load(root / "nll/pretrained.npz")
    test_text = (TINY_WIKI / "wiki.test.raw").read_text(encoding="utf-8")
    titles = [line for line in test_text.splitlines(keepends=True) if re.fullmatch(r" = [^=].* = \n", line)]
    assert str(kept["test_unit"]) == "articles" and len(kept["test_sizes"]) == len(titles) == 20
    assert kept["test_sizes"].sum() == len(kept["test"])
    m = read_json(root / "m/pretrained.json")["pretrained"]
    assert m["test_chunks"] == 20 and "test_ppl_lo" in m  # 20 articles: just enough for an interval
    # Each unit's tokens are its article's: the first title's article runs to the second title.
    tok = modeling.load_tokenizer(TINY_MODEL)
    second = test_text.index(titles[1])
    assert kept["test_sizes"][0] == len(tok(test_text[:second])["input_ids"]) - 1  # every token but the first
    protocol = read_json(root / "m/pretrained.info.json")["protocol"]["bootstrap"]
    assert protocol["units"] == {"test": "articles", "validation": "articles", "tiny-general-test": "chunks"}
    # JSON Lines: each record a document, each document a unit.
    (tmp_path / "docs").mkdir()
    docs = [f"Document {i} says " + "word " * (20 + i % 7) for i in range(200)]
    for split, rows in (("train", docs[:160]), ("validation", docs[160:180]), ("test", docs[180:])):
        (tmp_path / f"docs/{split}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in rows))
    root = prepare_in(project, **{"data.name": str(tmp_path / "docs")})
    run_main(evaluate, "--model", "pre", "--base", "pre", "--data", "prep", "--out", "m/pretrained.json",
             "--info", "m/pretrained.info.json", "--nll", "nll/pretrained.npz")
    kept = np.load(root / "nll/pretrained.npz")
    assert str(kept["test_unit"]) == "documents" and len(kept["test_sizes"]) == 20
    per_doc = [len(tok(d + "\n\n")["input_ids"]) for d in docs[180:]]
    assert list(kept["test_sizes"]) == [per_doc[0] - 1, *per_doc[1:]]


def test_train_cpu_threads_reaches_every_stage_that_runs_a_model(project, tmp_path):
    """train.cpu_threads: 1 once reached training alone: evaluate, tasks and generate kept every
    core beside other work (290-410 s each for evaluate on a real model, where 1 thread was faster)."""
    import shutil

    from stages import evaluate, generate, tasks, updates

    root = prepare_in(project, **{"train.cpu_threads": 1, "tasks.names": ["tasks/tiny_cloze.yaml"], "tasks.limit": 5,
                                  "tasks.merge_check": 0, "generate.max_new_tokens": 4, "generate.num_samples": 0})
    shutil.copytree(ROOT / "tasks", root / "tasks")
    before = torch.get_num_threads()
    runs = {"evaluate": (evaluate, "--model", "pre", "--base", "pre", "--data", "prep", "--out", "m/e.json",
                         "--info", "m/e.info.json", "--nll", "nll/e.npz"),
            "tasks": (tasks, "--model", "pre", "--base", "pre", "--out", "m/t.json", "--info", "m/t.info.json",
                      "--items", "items/t.npz"),
            "generate": (generate, "--model", "pre", "--base", "pre", "--data", "prep", "--out", "gen",
                         "--metrics", "m/generate"),
            "updates": (updates, "--base", "pre", "--full", "pre", "--lora", "pre", "--out", "m/u.json",
                        "--info", "m/u.info.json", "--values", "u.npz")}
    try:
        for name, (module, *args) in runs.items():
            torch.set_num_threads(2)
            run_main(module, *args)
            assert torch.get_num_threads() == 1, name
    finally:
        torch.set_num_threads(before)
