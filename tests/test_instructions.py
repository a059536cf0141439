"""Instruction and chat data through every stage: prompt/completion on the tiny GPT-2 and messages on
the tiny Llama (its Llama-3-shaped chat template), the loss on answers only by default, each example
padded and scored alone, answer-only perplexity equal to a brute-force computation, held-out
prompts answered beside their references, and bad input refused before any work."""

import json
import math
import re

import numpy as np
import pytest
import torch

from conftest import PREPARE_ARGS, once, params_writer, reset_accelerate, run_main, run_tasks, train_args
from ftstudy import loss, modeling
from ftstudy.config import ConfigError
from ftstudy.data import batches, examples, token_files
from ftstudy.measure import scoring, stats
from ftstudy.outputs import read_json
from ftstudy.synthetic import ASSETS, write_tiny_model
from stages import compare, evaluate, generate, prepare, report, train_full, train_lora

# One pytest-xdist worker runs this file: its module-scoped fixtures are built once.
pytestmark = pytest.mark.xdist_group("instructions")

INSTRUCT = ASSETS / "tiny-instruct"
FORMATS = {"prompt_completion": ("gpt2", INSTRUCT / "prompt_completion.jsonl"),
           "messages": ("llama", INSTRUCT / "messages.jsonl")}


def instruct_params(project, fmt: str, root, **overrides):
    family, source = FORMATS[fmt]
    model = root / f"tiny-{family}"
    if not model.exists():
        write_tiny_model(family, model)
    # Held-out answers: the fewest that still get an interval (stats.MIN_CHUNKS); each is a generation.
    # The tiny Llama's 128 tokens cut the last answer of most conversations (three in four of the
    # test split), which answer scoring leaves out: a larger test split keeps enough whole ones.
    return project(**{"model.name": str(model), "data.name": str(source), "data.format": fmt, "train.epochs": 1,
                      "train.eval_every": 0, "evaluate.bootstrap_samples": 200, "generate.test_prompts": 2,
                      "generate.answer_examples": stats.MIN_CHUNKS, "generate.max_new_tokens": 12, "generate.num_samples": 0}
                   | ({"data.test_fraction": 0.2} if fmt == "messages" else {}) | overrides)


def stage_args(method: str) -> tuple[str, ...]:
    """A training stage's command line as dvc.yaml gives it, below the test's folder."""
    return ("--data", "prep", "--base", "models/pretrained", "--checkpoints", "ckpt", "--out", f"models/{method}",
            "--metrics", f"m/train_{method}.json", "--info", f"m/train_{method}.info.json", "--plots",
            f"m/plots/train_{method}", "--live", f"m/live/train_{method}")


@pytest.fixture(scope="module", params=list(FORMATS))
def instruct_run(request, tmp_path_factory):
    """Every stage on one format, laid out as dvc.yaml lays it out, shared by this module's tests
    (read-only); built once per format and test process (conftest.once)."""
    fmt = request.param
    return once(("instructions", fmt), lambda: run_every_stage(fmt, tmp_path_factory.mktemp(fmt)))


def run_every_stage(fmt: str, root):
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        instruct_params(params_writer(root), fmt, root)
        run_main(prepare, "--out", "prep", "--pretrained", "models/pretrained", "--metrics", "m/prepare.json",
                 "--info", "m/prepare.info.json")
        for stage, method in ((train_full, "full"), (train_lora, "lora")):
            run_main(stage, *stage_args(method))
            reset_accelerate()
        for model in ("pretrained", "full", "lora"):
            run_main(evaluate, "--model", f"models/{model}", "--base", "models/pretrained", "--data", "prep",
                     "--out", f"m/evaluate/{model}.json", "--info", f"m/evaluate/{model}.info.json",
                     "--nll", f"nll/{model}.npz")
        run_main(generate, *(a for m in ("pretrained", "full", "lora") for a in ("--model", f"models/{m}")),
                 "--base", "models/pretrained", "--data", "prep", "--out", "gen", "--metrics", "m/generate")
        run_tasks(base="models/pretrained")
        run_main(compare, "--nll", "nll", "--tasks", "task-items", "--generations", "gen", "--curves", "m/plots",
                 "--out", "m/compare.json", "--info", "m/compare.info.json")
        run_main(report, "--metrics", "m", "--generations", "gen", "--out", "report.md", "--figures", "figures",
                 "--cards", "cards", "--headline", "m/headline.json")
        reset_accelerate()
    return fmt, root


def test_every_stage_runs_and_the_report_states_format_masking_and_answer_tokens(instruct_run):
    fmt, root = instruct_run
    meta = read_json(root / "prep/meta.json")
    assert meta["format"] == fmt and meta["split"]["carved"] == ["validation", "test"]
    for split in token_files.SPLITS:
        s = meta["splits"][split]
        assert s["answer_tokens"] > 0 and s["documents"] > 0
    full = read_json(root / "m/train_full.info.json")
    assert full["format"] == fmt and full["train_on_prompt"] is False and 0 < full["padding_share"] < 1
    ev = read_json(root / "m/evaluate/lora.json")["lora"]
    assert ev["test_tokens"] == meta["splits"]["test"]["answer_tokens"] and "test_ppl_blocks" not in ev
    assert read_json(root / "m/evaluate/full.json")["full"]["test_ppl"] < read_json(
        root / "m/evaluate/pretrained.json")["pretrained"]["test_ppl"]
    headline = read_json(root / "m/headline.json")  # the few figures `dvc exp show` reads (README)
    assert {"pretrained_ppl", "full_ppl", "lora_ppl", "full_train_s", "lora_train_s", "full_peak_gib", "lora_peak_gib",
            "full_vs_pretrained", "lora_vs_pretrained", "full_vs_lora"} <= set(headline)
    assert headline["lora_ppl"] == ev["test_ppl"] and all(isinstance(v, (int, float)) for v in headline.values())
    text = (root / "report.md").read_text()
    assert f"Instruction data, format `{fmt}`" in text
    assert "Training loss over the answer tokens alone (data.train_on_prompt: false)" in text
    assert f"{meta['splits']['test']['answer_tokens']:,} answer tokens of {meta['splits']['test']['documents']:,} test examples" in text
    assert "### Answers to held-out test prompts" in text and re.search(r"\| Prompt +\| Reference +\|", text)
    held = read_json(root / "gen/lora.json")["heldout"]
    test = meta["splits"]["test"]
    assert len(held) == stats.MIN_CHUNKS <= test["documents"] - test["answers_cut"]
    assert all(h["reference"] and h["prompt"] for h in held)
    assert read_json(root / "m/generate/lora.json")["lora"]["answers_truncated_left_out"] == test["answers_cut"]
    assert [h["example"] for h in held] == [h["example"] for h in read_json(root / "gen/pretrained.json")["heldout"]]
    # Every answer scored; the report shows the first two (generate.test_prompts) and pairs the scores.
    assert all(set(h["scores"]) == {"exact_match", "f1", "rouge_l"} for h in held)
    answers = read_json(root / "m/generate/lora.json")["lora"]["answers"]
    assert answers["items"] == len(held) and answers["f1"] == pytest.approx(np.mean([h["scores"]["f1"] for h in held]))
    assert "f1_lo" in answers and text.count(held[0]["reference"][:40]) >= 1
    pairs = read_json(root / "m/compare.json")["tasks"]["held-out answers"]
    assert set(pairs) == {"exact_match", "f1", "rouge_l"} and pairs["f1"]["full_vs_lora"]["items"] == len(held)
    assert "| held-out answers (f1)" in text and "On held-out answers (rouge_l), against the pretrained model:" in text
    assert headline["lora_held_out_answers_f1"] == answers["f1"]
    # The prompt panel shows each prompt once and each answer alone: never the chat template's system
    # prompt repeated on every answer, nor a prompt glued to its answer.
    first = read_json(root / "gen/lora.json")["prompts"][0]
    assert "Greedy answers to the prompt *" in text and "- Prompt 1: *" in text
    glued = " ".join((first["prompt"] + first["greedy"]).split())
    assert glued not in " ".join(text.split())


def test_answer_only_perplexity_equals_a_brute_force_per_example_computation(instruct_run):
    fmt, root = instruct_run
    meta = read_json(root / "prep/meta.json")
    test = examples.load(root / "prep", "test", meta)
    model = modeling.load_for_eval(root / "models/full", root / "models/pretrained", "x")
    nll = []
    with torch.no_grad():
        for i in range(len(test)):  # each example alone, unpadded, through the model's own logits
            tokens, mask = test.example(i)
            logits = model(input_ids=torch.tensor(tokens.astype(np.int64))[None]).logits[0, :-1].double()
            logp = torch.log_softmax(logits, -1)
            nll += [-logp[j - 1, int(tokens[j])].item() for j in range(1, len(tokens)) if mask[j]]
    got = read_json(root / "m/evaluate/full.json")["full"]
    assert got["test_ppl"] == pytest.approx(math.exp(np.mean(nll)), rel=1e-5)
    assert got["test_examples"] == len(test) and got["test_chunks"] == len(test)
    # Bits per byte over the bytes the scored answer tokens spell, each run of them decoded, special
    # tokens (EOS, the template's end of turn) spelling none: not over the whole records.
    tok = modeling.load_tokenizer(root / "models/pretrained")
    answer_bytes = 0
    for i in range(len(test)):
        tokens, mask = test.example(i)
        runs = np.split(np.arange(len(mask)), np.flatnonzero(np.diff(mask.astype(np.int8))) + 1)
        answer_bytes += sum(len(tok.decode(tokens[r].tolist(), skip_special_tokens=True).encode("utf-8"))
                            for r in runs if mask[r[0]])
    assert meta["splits"]["test"]["answer_bytes"] == answer_bytes < meta["splits"]["test"]["bytes"]
    assert got["test_bpb"] == pytest.approx(sum(nll) / (math.log(2) * answer_bytes), rel=1e-5)


def test_padded_batches_score_each_example_as_if_alone(instruct_run):
    fmt, root = instruct_run
    test = examples.load(root / "prep", "test", read_json(root / "prep/meta.json"))
    model = modeling.load_for_eval(root / "models/lora", root / "models/pretrained", str(root / f"tiny-{FORMATS[fmt][0]}"))
    alone, counts_alone = scoring.answer_nll(model, test, torch.device("cpu"), batch_size=1)
    padded, counts = scoring.answer_nll(model, test, torch.device("cpu"), batch_size=5)
    assert counts.tolist() == counts_alone.tolist()
    np.testing.assert_allclose(padded, alone, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("train_on_prompt", [False, True])
def test_prompt_tokens_get_no_gradient_by_default(instruct_run, train_on_prompt):
    fmt, root = instruct_run
    ex = examples.load(root / "prep", "train", read_json(root / "prep/meta.json"))
    units = batches.ExampleBatches(ex, train_on_prompt=train_on_prompt)
    batch = {k: torch.from_numpy(v) for k, v in units.batch(np.arange(4)).items()}
    model = modeling.load_causal_lm(root / "models/pretrained")
    model.eval()
    body, _ = loss.body_and_head(model)
    kept = {}

    def keep(module, inputs, out):
        out.last_hidden_state.retain_grad()
        kept["hidden"] = out.last_hidden_state

    body.register_forward_hook(keep)
    loss.CausalLMLoss(model)(**batch).backward()
    grad = kept["hidden"].grad[:, :-1].abs().sum(-1)  # per position predicting the next token
    answer = torch.zeros_like(batch["target_mask"])
    for row, i in enumerate(range(4)):
        _, mask = ex.example(i)
        answer[row, :len(mask) - 1] = torch.from_numpy(mask[1:].astype(bool))
    real = batch["attention_mask"][:, 1:].bool()
    prompt = real & ~answer
    assert (grad[answer] > 0).all()
    assert (grad[~real] == 0).all()  # padding: never
    assert ((grad[prompt] > 0).all() if train_on_prompt else (grad[prompt] == 0).all())


def test_grad_accum_equals_the_larger_batch_on_examples_of_every_length(project, tmp_path):
    from conftest import no_dropout

    instruct_params(project, "prompt_completion", tmp_path, **{"lora.dropout": 0.0})
    run_main(prepare, *PREPARE_ARGS)
    no_dropout(tmp_path / "pre")
    curves = []
    for tag, b, ga in (("b8", 8, 1), ("b4x2", 4, 2)):
        instruct_params(project, "prompt_completion", tmp_path, **{"lora.dropout": 0.0, "train.batch_size": b,
                                                                   "train.grad_accum": ga})
        run_main(train_full, *train_args(tag))
        reset_accelerate()
        curves.append([float(x.split(",")[1]) for x in (tmp_path / f"m/plots/{tag}/train_loss.csv").read_text().splitlines()[1:]])
    assert curves[1] == pytest.approx(curves[0], rel=1e-5)


def test_a_long_example_is_cut_to_the_block_and_counted(project, tmp_path):
    instruct_params(project, "prompt_completion", tmp_path, **{"data.block_size": 44, "evaluate.stride": 16})
    run_main(prepare, *PREPARE_ARGS)
    train = read_json(tmp_path / "m/prepare.json")["corpus"]["train"]
    assert train["truncated"] > 0
    ex = examples.load(tmp_path / "prep", "train", read_json(tmp_path / "prep/meta.json"))
    assert max(np.diff(ex.offsets)) <= 44


GENERATE_ARGS = ("--model", "pre", "--base", "pre", "--data", "prep")


def test_an_answer_cut_by_the_block_is_left_out_of_scoring_and_counted(project, tmp_path, capsys):
    """Against a reference that data.block_size cut, a whole, correct answer scores below 1: such an
    example is never asked, and counted; an uncut one is scored against its whole completion."""
    instruct_params(project, "prompt_completion", tmp_path, **{"data.block_size": 90, "generate.answer_examples": 1000})
    run_main(prepare, *PREPARE_ARGS)
    test = examples.load("prep", "test", read_json("prep/meta.json"))
    tok = modeling.load_tokenizer("pre")
    completion = {json.loads(line)["prompt"]: json.loads(line)["completion"].strip()
                  for line in (INSTRUCT / "prompt_completion.jsonl").read_text().splitlines()}

    def reference(i):  # (its prompt, its reference) as prepared
        tokens, _ = test.example(i)
        start, end = test.last_answer(i)
        return tok.decode(tokens[:start].tolist()), tok.decode(tokens[start:end].tolist(), skip_special_tokens=True).strip()

    cut = set(test.cut.tolist())
    assert 0 < len(cut) < len(test)
    assert read_json("prep/meta.json")["splits"]["test"]["truncated"] > len(cut)  # one lost only its EOS: whole, scored
    assert all(reference(i)[1] != completion[reference(i)[0]] for i in cut)  # cut short, each of them
    run_main(generate, *GENERATE_ARGS, "--out", "gen", "--metrics", "m/generate")
    texts = read_json("gen/pre.json")
    held = texts["heldout"]
    assert {h["example"] for h in held} == set(range(len(test))) - cut
    assert all(h["reference"] == completion[reference(h["example"])[0]] and "scores" in h for h in held)
    metrics = read_json("m/generate/pre.json")["pre"]
    assert metrics["answers_truncated_left_out"] == texts["left_out"]["answers_truncated"] == len(cut)
    assert metrics["answers"]["items"] == len(held) and "data.block_size" in texts["left_out"]["why"]
    assert f"; {len(cut)} held-out example(s) left out of answer scoring: their reference" in capsys.readouterr().out


def test_every_training_seed_answers_the_same_held_out_examples(project, tmp_path):
    """A study's seeds vary training alone: the held-out examples (and so the panel's prompts) are
    drawn by data.split_seed; the sampled continuations still follow seed."""
    runs = []
    for seed in (1, 2):
        instruct_params(project, "prompt_completion", tmp_path, **{"seed": seed, "generate.answer_examples": 3,
                                                                    "generate.num_samples": 1, "generate.max_new_tokens": 6})
        if seed == 1:  # prepare reads no seed: a study's seeds share its outputs
            run_main(prepare, *PREPARE_ARGS)
        run_main(generate, *GENERATE_ARGS, "--out", f"gen-{seed}", "--metrics", f"m/generate-{seed}")
        runs.append(read_json(f"gen-{seed}/pre.json"))
    one, two = runs
    assert len(one["heldout"]) == 3 < len(examples.load("prep", "test", read_json("prep/meta.json")))
    assert [(h["example"], h["prompt"], h["reference"]) for h in one["heldout"]] == [
        (h["example"], h["prompt"], h["reference"]) for h in two["heldout"]]
    assert [p["prompt"] for p in one["prompts"]] == [p["prompt"] for p in two["prompts"]]
    assert [p["samples"] for p in one["prompts"]] != [p["samples"] for p in two["prompts"]]


def test_a_block_that_leaves_no_answer_is_refused_saying_what_to_raise(project, tmp_path):
    _refused(project, tmp_path, token_files.DataError, r"split 'train' came out empty \(0 examples; [\d,]+ dropped with "
             r"no answer token within data.block_size=16\); .*, or raise data.block_size$",
             **{"data.block_size": 16, "evaluate.stride": 16})


def _refused(project, tmp_path, error, pattern, fmt="prompt_completion", source=None, **overrides):
    instruct_params(project, fmt, tmp_path, **({"data.name": str(source)} if source else {}) | overrides)
    with pytest.raises(error) as e:
        run_main(prepare, *PREPARE_ARGS)
    assert re.search(pattern, str(e.value)), str(e.value)
    assert "\n" not in str(e.value) and not (tmp_path / "prep").exists()


def _jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


GOOD = [{"prompt": f"Request: {i}\nAnswer:", "completion": " The town of Marven ."} for i in range(60)]


def test_a_missing_field_names_its_key_and_line(project, tmp_path):
    records = GOOD[:20] + [{"prompt": "x", "answer": "y"}] + GOOD[20:]
    _refused(project, tmp_path, token_files.DataError, r"bad.jsonl, line 21: no field 'completion' \(data.completion_column\); "
             r"its fields are prompt, answer; set data.completion_column", source=_jsonl(tmp_path / "bad.jsonl", records))


def test_an_empty_completion_names_its_row(project, tmp_path):
    records = GOOD[:7] + [{"prompt": "x", "completion": "  "}] + GOOD[7:]
    _refused(project, tmp_path, token_files.DataError, r"empty.jsonl, row 8: the completion \(data.completion_column\) is empty",
             source=_jsonl(tmp_path / "empty.jsonl", records))


def test_an_unknown_role_names_its_row(project, tmp_path):
    chat = [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}] * 30
    chat = chat[:4] + [{"messages": [{"role": "narrator", "content": "q"}, {"role": "assistant", "content": "a"}]}] + chat
    _refused(project, tmp_path, token_files.DataError, r"roles.jsonl, row 5: data.messages_column: unknown role 'narrator'; "
             r"roles are system, user, assistant", fmt="messages", source=_jsonl(tmp_path / "roles.jsonl", chat))


def test_messages_for_a_tokenizer_without_a_chat_template_are_refused_naming_the_key(project, tmp_path):
    _refused(project, tmp_path, ConfigError, r"^data.format: messages renders each conversation with the tokenizer's chat "
             r"template, and .*tiny-gpt2's tokenizer has none", fmt="messages",
             **{"model.name": str(ASSETS / "tiny-gpt2")})


def test_a_text_file_cannot_hold_instruction_fields(project, tmp_path):
    (tmp_path / "notes.txt").write_text("just text\n" * 50)
    _refused(project, tmp_path, token_files.DataError, r"notes.txt: a text file holds no fields", source=tmp_path / "notes.txt")


def test_the_interval_resamples_whole_examples():
    nll = np.random.default_rng(0).gamma(2.0, 1.0, size=600)
    sizes = np.full(30, 20)
    m = stats.ppl_metrics(nll, 1024, 500, 1, sizes=sizes)
    assert m["chunks"] == 30 and m["ppl_lo"] < m["ppl"] < m["ppl_hi"]
    assert "ppl_lo" not in stats.ppl_metrics(nll[:19 * 20], 1024, 500, 1, sizes=sizes[:19])


def test_examples_longer_than_the_context_are_cut_without_a_third_party_warning(project, tmp_path, capfd):
    long = [{"prompt": "Request: " + "word " * 300, "completion": " The town of Marven ."}] + GOOD
    instruct_params(project, "prompt_completion", tmp_path, **{"data.name": str(_jsonl(tmp_path / "long.jsonl", long)),
                                                                "model.name": str(ASSETS / "tiny-gpt2")})  # max length 128
    capfd.readouterr()
    run_main(prepare, *PREPARE_ARGS)
    out, err = capfd.readouterr()
    assert "longer than the specified maximum" not in out + err
    splits = read_json("prep/meta.json")["splits"]
    # The long one, cut to data.block_size, its answer cut off with it: dropped, and counted.
    assert sum(splits[s]["dropped_no_answer"] for s in token_files.SPLITS) == 1


def test_the_bundled_chat_model_takes_chat_data(project, tmp_path):
    """assets/tiny-chat: the tiny GPT-2 with a chat template (built by assets/build_assets.py), so chat
    data runs on a bundled model; each assistant turn ends at <|endoftext|>, where answers stop."""
    from ftstudy.measure import generation
    from stages import check_params

    chat = ASSETS / "tiny-chat"
    tok = modeling.load_tokenizer(chat)
    assert generation.stop_ids(tok) == [tok.eos_token_id]
    project(**{"model.name": str(chat), "data.name": str(INSTRUCT / "messages.jsonl"), "data.format": "messages"})
    run_main(check_params, "--snapshot", "none", "--prepared", "none")
    run_main(prepare, *PREPARE_ARGS)
    test = examples.load("prep", "test", read_json("prep/meta.json"))
    whole = [i for i in range(len(test)) if len(test.example(i)[0]) < 128]  # not cut to data.block_size
    assert len(whole) >= 3
    for i in whole:
        tokens, mask = test.example(i)
        assert tokens[mask.astype(bool)][-1] == tok.eos_token_id  # each answer ends at the end of its turn
        assert tok.decode(tokens[:test.last_answer(i)[0]].tolist()).endswith("assistant:\n")


def test_model_label_names_the_model_in_the_report_and_the_cards(instruct_run, tmp_path, monkeypatch):
    """params model.label, where set, names the model everywhere the report and the cards do (its
    folder's name otherwise: 'Fully fine-tuned model' for a folder called model)."""
    import shutil

    import yaml

    fmt, root = instruct_run
    for folder in ("m", "gen"):
        shutil.copytree(root / folder, tmp_path / folder)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["model"]["label"] = "SmolLM2-135M"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    run_main(report, "--metrics", "m", "--generations", "gen", "--out", "report.md", "--figures", "figures",
             "--cards", "cards", "--headline", "m/headline.json")
    text = (tmp_path / "report.md").read_text()
    assert text.startswith("# SmolLM2-135M on ") and "| Fully fine-tuned SmolLM2-135M " in text
    assert "Fully fine-tuned SmolLM2-135M" in (tmp_path / "cards/full/README.md").read_text()
    assert params["model"]["name"].rstrip("/").rsplit("/", 1)[-1] not in text.splitlines()[0]


def test_held_out_answers_in_batches_equal_those_one_at_a_time(instruct_run):
    """generate answers the held-out prompts generate.batch_size at a time: the same answers as one
    prompt at a time. (These answers fill the tiny models' 128-token context, so each batch holds
    prompts of one length; tests/test_generation.py pads prompts of several.)"""
    import yaml

    from ftstudy.measure import generation

    fmt, root = instruct_run
    params = yaml.safe_load((root / "params.yaml").read_text())
    assert params["generate"]["batch_size"] > 1
    held = read_json(root / "gen/lora.json")["heldout"]
    test = examples.load(root / "prep", "test", read_json(root / "prep/meta.json"))
    model = modeling.load_for_eval(root / "models/lora", root / "models/pretrained", params["model"]["name"])
    tokenizer = modeling.load_tokenizer(root / "models/pretrained")
    with torch.no_grad():
        one = generation.answer_heldout(model, tokenizer, test, [h["example"] for h in held],
                                        modeling.context_length(root / "models/pretrained"), torch.device("cpu"))
    assert [a["answer"] for a in one] == [h["answer"] for h in held]
