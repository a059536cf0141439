"""The pipeline end to end: real DVC in a sandbox made by scripts/sandbox.py, offline, on CPU.

One demo build is made for the whole test run, and one `dvc exp run -n r16 -S lora.r=16` on a copy
of it is shared by the tests that read an experiment; each test that changes a sandbox works in
its own copy, so no test depends on what another left behind. Where the point is which stages
would run, `dvc repro --dry` tells without running them."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import SETTINGS, dvc, once, outcome
from ftstudy.config import override_file
from ftstudy.cores import usable_cores
from ftstudy.outputs import read_json
from ftstudy.synthetic import write_tiny_model
from ftstudy.train import checkpoints
from scripts import sandbox

pytestmark = pytest.mark.slow

LORA_STAGES = {"check_params", "train_lora", "evaluate@lora", "tasks@lora", "generate@lora", "updates", "compare",
               "report"}
ALL_STAGES = {"check_params", "prepare", "train_full", "train_lora", "updates", "compare", "report"} | {
    f"{stage}@{m}" for stage in ("evaluate", "tasks", "generate") for m in ("pretrained", "full", "lora")}
# Other data: everything reruns but the pretrained model's benchmarks, which do not read the data.
DATA_STAGES = ALL_STAGES - {"tasks@pretrained"}


# Floating-point metrics that two runs may give differently in the last bits (README, "Determinism").
FLOAT_RTOL = 1e-6


def stages_run(proc) -> set[str]:
    out = proc if isinstance(proc, str) else proc.stdout + proc.stderr
    return set(re.findall(r"Running stage '([^']+)'", out))


def differences(a: dict, b: dict) -> list[str]:
    """What differs between two outcomes: hashes exactly, floats beyond FLOAT_RTOL, the rest exactly."""
    out = [f"{k}: {a['hashes'].get(k)} vs {b['hashes'].get(k)}" for k in a["hashes"] | b["hashes"]
           if a["hashes"].get(k) != b["hashes"].get(k)]
    for k in sorted(a["metrics"].keys() | b["metrics"].keys()):
        x, y = a["metrics"].get(k), b["metrics"].get(k)
        if isinstance(x, float) and isinstance(y, float):
            if x != pytest.approx(y, rel=FLOAT_RTOL, abs=1e-12):
                out.append(f"{k}: {x!r} vs {y!r}")
        elif x != y:
            out.append(f"{k}: {x!r} vs {y!r}")
    return out


def copy_build(demo_build, dest):
    """A copy of the demo build (git, DVC cache and outputs included) at `dest`."""
    src, first, result = demo_build
    shutil.copytree(src, dest, symlinks=True)
    return dest, first, result


@pytest.fixture
def repo(demo_build, tmp_path):
    """This test's own copy of the demo build."""
    return copy_build(demo_build, tmp_path / "sandbox")


@pytest.fixture(scope="module")
def r16(demo_build, tmp_path_factory):
    """A copy of the demo build after `dvc exp run -n r16 -S lora.r=16`: (folder, the run's output).
    Read-only for the tests that share it."""
    def build():
        dest, *_ = copy_build(demo_build, tmp_path_factory.mktemp("r16") / "sandbox")
        return dest, dvc(dest, "exp", "run", "-n", "r16", "-S", "lora.r=16")

    return once("r16", build)


def test_repro_runs_every_stage_and_writes_every_output(demo_build):
    dest, first, _ = demo_build
    assert stages_run(first) == ALL_STAGES
    for path in ("data/prepared/train.bin", "data/prepared/meta.json", "models/pretrained/model.safetensors",
                 "models/full/model.safetensors", "models/full/tokenizer.json",
                 "models/lora/adapter_model.safetensors", "metrics/prepare.json", "metrics/train_full.json",
                 "metrics/train_lora.json", "metrics/plots/train_full/train_loss.csv",
                 "metrics/plots/train_lora/val_loss.csv", "metrics/report.md", "metrics/compare.json",
                 *[f"data/nll/{m}.npz" for m in ("pretrained", "full", "lora")],
                 *[f"metrics/evaluate/{m}.json" for m in ("pretrained", "full", "lora")],
                 *[f"metrics/generate/{m}.json" for m in ("pretrained", "full", "lora")],
                 *[f"generations/{m}.json" for m in ("pretrained", "full", "lora")]):
        assert (dest / path).is_file(), path
    assert not (dest / "models/lora/model.safetensors").exists()
    # Metrics files hold numbers only; their descriptions (units, protocols) sit in <name>.info.json beside them.
    strings = [(str(f.relative_to(dest)), path) for f in (dest / "metrics").rglob("*.json") if not f.name.endswith(".info.json")
               for path, v in _leaves(read_json(f)) if isinstance(v, str)]
    assert strings == []
    # The demo's tasks leave the pretrained model room to learn and to forget: off the ceiling and the floor.
    for task, row in read_json(dest / "metrics/tasks/pretrained.json")["pretrained"]["tasks"].items():
        for metric in (k for k in row if k != "items" and not k.endswith(("_lo", "_hi"))):
            assert 0.02 <= row[metric] <= 0.95, (task, metric, row[metric])


def _leaves(x, path: str = ""):
    """(path, value) of every leaf of a JSON value."""
    if isinstance(x, dict):
        for k, v in x.items():
            yield from _leaves(v, f"{path}.{k}")
    elif isinstance(x, list):
        for i, v in enumerate(x):
            yield from _leaves(v, f"{path}[{i}]")
    else:
        yield path, x


def test_fine_tuning_beats_the_pretrained_model(demo_build):
    dest, *_ = demo_build
    ppl = {m: read_json(dest / f"metrics/evaluate/{m}.json")[m]["test_ppl"] for m in ("pretrained", "full", "lora")}
    assert ppl["full"] < ppl["pretrained"] and ppl["lora"] < ppl["pretrained"], ppl
    report = (dest / "metrics/report.md").read_text()
    assert f"{ppl['full']:.2f}" in report and "| Model" in report
    headings = [line for line in report.splitlines() if line.startswith("## ")]
    assert headings == ["## Efficiency", "## Quality", "## Tasks", "## What each method changed in the weights",
                        "## Generation quality", "## Findings", "## Environment"]
    assert "### Validation during training" in report and "Test ppl ratio [95% paired CI]" in report
    assert "tiny-general-test ppl [95% CI]" in report and "LoRA integrity" in report
    # Named after model.name (assets/tiny-gpt2), never an assumed GPT-2.
    assert report.startswith("# tiny-gpt2 on tiny-wikitext:") and "LoRA fine-tuned tiny-gpt2" in report
    assert "GPT-2" not in report
    headline = report.split("\n\n")[2].splitlines()  # title, intro, then the headline table
    assert headline[0].startswith("| Model") and max(map(len, headline)) <= 120, headline


def test_the_model_cards_are_real_hub_cards_and_the_report_has_its_pictures(demo_build):
    from huggingface_hub import ModelCard

    dest, *_ = demo_build
    for model, library in (("full", "transformers"), ("lora", "peft")):
        card = ModelCard.load(dest / f"cards/{model}/README.md")
        test_ppl = read_json(dest / f"metrics/evaluate/{model}.json")[model]["test_ppl"]
        assert card.data.library_name == library and "ftstudy" in card.data.tags
        assert card.data.eval_results[0].metric_type == "perplexity"
        assert card.data.eval_results[0].metric_value == pytest.approx(test_ppl, rel=1e-4)
        assert card.data.base_model is None and "a local folder" in card.text  # the demo's base has no Hub id
        assert "## How to load" in card.text
    assert not (dest / "models/lora/README.md").exists()  # PEFT's empty template is not left to mislead
    report = (dest / "metrics/report.md").read_text()
    # What each method changed: the section, its picture and a finding, for both fine-tuned models.
    assert "## What each method changed in the weights" in report and "intruder dimensions" in report
    updates = read_json(dest / "metrics/updates.json")["updates"]
    assert updates["lora"]["rank"] == 8 and updates["full"]["effective_rank"] > 8 and updates["full"]["matrices"] == 8
    assert "Full fine-tuning's update took an effective rank of" in report
    for name in ("val_loss", "test_ppl", "tradeoff", "updates"):
        path = dest / f"metrics/report-figures/{name}.png"
        assert f"(report-figures/{name}.png)" in report and path.read_bytes()[:4] == b"\x89PNG"
        assert path.stat().st_size < 100_000


def test_plots_render_both_methods(demo_build):
    dest, *_ = demo_build
    plots = json.loads(dvc(dest, "plots", "show", "--json").stdout)["data"]
    assert {"Training loss", "Validation loss"} <= set(plots)
    sources = json.dumps(plots["Training loss"])
    assert "train_full/train_loss.csv" in sources and "train_lora/train_loss.csv" in sources


def test_second_repro_runs_nothing(repo):
    dest, *_ = repo
    again = dvc(dest, "repro")
    assert stages_run(again) == set()
    assert "up to date" in again.stdout


@pytest.mark.xdist_group("r16")  # one worker builds the r16 experiment for these three
def test_exp_run_reruns_only_the_lora_stages_and_metrics_diff_shows_it(demo_build, r16):
    dest, exp = r16
    before = read_json(demo_build[0] / "metrics/train_lora.json")["lora"]["trainable_params"]
    assert stages_run(exp) == LORA_STAGES
    assert read_json(dest / "metrics/train_lora.json")["lora"]["trainable_params"] == 2 * before
    diff = json.loads(dvc(dest, "metrics", "diff", "--json").stdout)
    assert diff["metrics/train_lora.json"]["lora.trainable_params"]["diff"] == before
    assert "lora.test_ppl" in diff["metrics/evaluate/lora.json"]
    changed = {f for f, keys in diff.items() if keys}
    assert changed <= {"metrics/train_lora.json", "metrics/evaluate/lora.json", "metrics/generate/lora.json",
                       "metrics/tasks/lora.json", "metrics/compare.json", "metrics/headline.json",
                       "metrics/updates.json"}, changed
    # What the update changed: LoRA's measured rank follows r; full fine-tuning's numbers stay.
    assert diff["metrics/updates.json"]["updates.lora.rank"]["new"] == 16
    assert not [k for k, v in diff["metrics/updates.json"].items() if k.startswith("updates.full.") and v.get("diff")]
    assert {k for k in diff.get("metrics/headline.json", {}) if diff["metrics/headline.json"][k].get("diff")} <= {
        "lora_ppl", "lora_ppl_lo", "lora_ppl_hi", "lora_train_s", "lora_peak_gib",
        "lora_vs_pretrained", "lora_vs_pretrained_lo", "lora_vs_pretrained_hi", "full_vs_lora", "full_vs_lora_lo",
        "full_vs_lora_hi"} | {k for k in diff.get("metrics/headline.json", {}) if k.startswith("lora_tiny_")}
    # Only comparisons that involve LoRA (and time to quality, measured against LoRA) may move.
    assert not [k for k in diff.get("metrics/compare.json", {})
                if k.startswith("paired.full_vs_pretrained") or re.match(r"tasks\..*\.full_vs_pretrained\.", k)]


@pytest.mark.xdist_group("r16")  # one worker builds the r16 experiment for these three
def test_readme_exp_show_command_fits_120_columns(r16):
    dest, _ = r16
    readme = (sandbox.ROOT / "README.md").read_text()
    command = re.search(r"^(dvc exp show [^\n#]*?)\s*(#.*)?$", readme, re.M).group(1)
    proc = subprocess.run(command, shell=True, cwd=dest, capture_output=True, text=True,
                          env=os.environ | sandbox.ENV | {"COLUMNS": "120"})
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert max(map(len, lines)) <= 120, proc.stdout
    assert "…" not in proc.stdout, proc.stdout
    table = proc.stdout
    assert "lora.r" in table and "16" in table and "8" in table
    for column in ("pretrained_ppl", "full_ppl", "lora_ppl", "full_train_s", "lora_train_s"):
        assert column in table, (column, table)
    # LoRA's new test perplexity, from the experiment's headline figures, as exp show rounds it.
    new = read_json(dest / "metrics/headline.json")["lora_ppl"]
    assert f"{new:.5g}"[:5] in table, (new, table)


def test_misspelled_param_fails_before_training(repo):
    dest, *_ = repo
    lock, adapter = (dest / "dvc.lock").read_bytes(), (dest / "models/lora/adapter_model.safetensors").read_bytes()
    # DVC refuses `-S lora.rr=16` itself, but `+lora.rr=16` (or a hand edit) adds the key silently.
    proc = dvc(dest, "exp", "run", "-S", "+lora.rr=16", check=False)
    assert proc.returncode != 0
    assert "lora.rr: unknown key; did you mean lora.r?" in proc.stdout + proc.stderr
    assert stages_run(proc) <= {"check_params", "train_lora"}
    assert (dest / "dvc.lock").read_bytes() == lock
    assert (dest / "models/lora/adapter_model.safetensors").read_bytes() == adapter


@pytest.mark.parametrize("override,message", [
    ("lora.target_modules=[c_attn,qkv]", "lora.target_modules: 'qkv' matches no layer of this model; valid names: "
                                         "c_attn, c_fc, c_proj, lm_head"),
    ("data.block_size=100000", "data.block_size: 100000 exceeds the context of assets/tiny-gpt2 (128 tokens); set it "
                               "to at most 128")])
def test_a_mistake_knowable_from_the_models_config_is_refused_before_anything_is_deleted(repo, override, message):
    """Both once failed in their own stage after DVC had removed its previous outputs: the metrics
    were gone from the workspace. check_params reads the model's config (here a local folder) first."""
    dest, *_ = repo
    outputs = {p: p.read_bytes() for p in (dest / "metrics").rglob("*") if p.is_file()}
    proc = dvc(dest, "exp", "run", "-S", override, check=False)
    assert proc.returncode != 0 and stages_run(proc) == {"check_params"}
    errors = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("check_params: error:")]
    assert len(errors) == 1 and message in errors[0], proc.stdout + proc.stderr
    status = subprocess.run(["git", "status", "--porcelain", "--", "metrics"], cwd=dest, capture_output=True, text=True)
    assert status.stdout == "" and {p: p.read_bytes() for p in (dest / "metrics").rglob("*") if p.is_file()} == outputs


def test_misspelled_section_added_by_hand_fails_in_seconds(repo):
    dest, *_ = repo
    lock = (dest / "dvc.lock").read_bytes()
    outputs = {p: p.read_bytes() for p in (dest / "metrics").rglob("*") if p.is_file()}
    with open(dest / "params.yaml", "a") as f:
        f.write("\ntrian:\n  epochs: 2\n")
    proc = dvc(dest, "repro", check=False)
    assert proc.returncode != 0
    assert "trian: unknown key; did you mean train?" in proc.stdout + proc.stderr
    assert stages_run(proc) == {"check_params"}
    assert (dest / "dvc.lock").read_bytes() == lock
    assert {p: p.read_bytes() for p in (dest / "metrics").rglob("*") if p.is_file()} == outputs


def _running(cwd: Path, module: str) -> bool:
    """Whether a process runs `python -m module` in `cwd` (a stage that DVC started there)."""
    cwd = cwd.resolve()
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if f"-m\0{module}\0".encode() in (proc / "cmdline").read_bytes() and (proc / "cwd").resolve() == cwd:
                return True
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return False


def _repro_killed_when(dest, seen, after: float = 0.0) -> str:
    """Start `dvc repro`, SIGKILL its whole process group `after` seconds after seen(output so far)
    is true."""
    proc = subprocess.Popen(["dvc", "repro"], cwd=dest, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env=os.environ | sandbox.ENV, start_new_session=True)
    chunks: list[bytes] = []
    reader = threading.Thread(target=lambda: chunks.extend(iter(lambda: proc.stdout.read(64), b"")), daemon=True)
    reader.start()
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline:
        if seen(b"".join(chunks).decode(errors="replace")):
            time.sleep(after)
            os.killpg(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait()
    reader.join(5)
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    return b"".join(chunks).decode(errors="replace")


def test_training_killed_mid_epoch_resumes_to_identical_results(demo_build, tmp_path):
    """A second clean sandbox, built beside a CPU-bound process, killed mid-training and rerun, ends
    identical to the demo build made on a quiet machine: the resume is exact, and the same params
    give the same hashes and metrics whatever the load (the thread count follows the usable cores,
    not their load: train.cpu_threads auto)."""
    _, _, first = demo_build
    dest = sandbox.make_sandbox(tmp_path / "killed", SETTINGS)
    ckpts = dest / ".checkpoints"
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])  # a neighbour keeping one core busy
    try:
        # Killed once a checkpoint of train_full (every 10 of its 53 steps) is complete, mid-epoch:
        # renamed from its temp folder (one killed before the rename is partial, and not resumed).
        _repro_killed_when(dest, lambda out: "train_full" in out
                           and any(checkpoints.complete(run) for run in ckpts.glob("full-*")))
        assert not (dest / "models/full").exists()
        rerun = dvc(dest, "repro")
    finally:
        busy.kill()
        busy.wait()
    threads = {s["cpu_threads"] for m in ("full", "lora") for s in read_json(dest / f"metrics/train_{m}.info.json")["segments"]}
    assert threads == {usable_cores()}
    assert re.search(r"train_full: resuming from .*step-\d+ \(step \d+ of 53\)", rerun.stdout + rerun.stderr)
    assert differences(outcome(dest), first) == []
    assert not any(ckpts.iterdir()), "checkpoints are removed after success"
    # The live curve went on from the killed run's files, each step logged once.
    live = (dest / "metrics/live/train_full/plots/metrics/train/loss.tsv").read_text().splitlines()[1:]
    assert [int(line.split("\t")[0]) for line in live] == list(range(1, 54))


def test_a_revision_change_touches_prepare_alone(repo):
    dest, *_ = repo
    for key in ("model.revision", "data.revision"):
        override_file(dest / "params.yaml", {key: "v2"})
        changed = json.loads(dvc(dest, "status", "--json").stdout)
        assert set(changed) == {"check_params", "prepare"}, (key, changed)  # the rest follows prepare's outputs
        override_file(dest / "params.yaml", {key: None})


def test_evaluate_killed_partway_leaves_no_partial_file_and_the_run_cache_brings_the_outputs_back(repo):
    dest, *_ = repo
    assert "up to date" in dvc(dest, "status").stdout
    old = {p: p.read_bytes() for p in (dest / "metrics/evaluate").iterdir()}
    override_file(dest / "params.yaml", {"evaluate.stride": 32})
    # Killed 0.5 s after the first evaluate stage's process started (a warm one takes about 1 s, a
    # cold one 4 or more): mid-stage, never while DVC writes dvc.lock between two stages (a fixed
    # delay after DVC's "Running stage" line once landed there, and left the lock half written).
    _repro_killed_when(dest, lambda out: _running(dest, "stages.evaluate"), after=0.5)
    assert not [f for f in dest.rglob("*.tmp") if ".dvc" not in f.parts]
    # The change undone: what DVC removed before the killed run comes back from its run-cache, and
    # nothing trains or scores again.
    override_file(dest / "params.yaml", {"evaluate.stride": 64})  # the demo's, as committed
    back = dvc(dest, "repro")
    assert "Stage 'evaluate@pretrained' is cached - skipping run" in back.stdout
    assert stages_run(back) <= {"check_params", "compare", "report"}  # check_params has no outputs to cache
    assert {p: p.read_bytes() for p in (dest / "metrics/evaluate").iterdir()} == old


@pytest.mark.xdist_group("r16")  # one worker builds the r16 experiment for these three
def test_an_experiment_run_before_is_restored_from_the_run_cache(demo_build, r16, tmp_path):
    """r=16, then r=8 again (the baseline's value): DVC restores r=8's outputs instead of training."""
    dest = tmp_path / "sandbox"
    shutil.copytree(r16[0], dest, symlinks=True)
    again = dvc(dest, "exp", "run", "-S", "lora.r=8")
    assert "Stage 'train_lora' is cached - skipping run, checking out outputs" in again.stdout
    assert stages_run(again) <= {"check_params", "report"}
    assert json.loads(dvc(dest, "metrics", "diff", "--json").stdout) == {}
    assert (dest / "models/lora/adapter_model.safetensors").read_bytes() == (
        demo_build[0] / "models/lora/adapter_model.safetensors").read_bytes()


def test_push_and_pull_restore_identical_models(repo, tmp_path):
    dest, *_ = repo
    dvc(dest, "remote", "add", "-d", "store", str(tmp_path / "store"))
    dvc(dest, "push")
    before = {p.relative_to(dest): p.read_bytes() for p in (dest / "models").glob("*/**/*") if p.is_file()}
    shutil.rmtree(dest / "models")
    shutil.rmtree(dest / ".dvc" / "cache")
    dvc(dest, "pull")
    after = {p.relative_to(dest): p.read_bytes() for p in (dest / "models").glob("*/**/*") if p.is_file()}
    assert after == before and any("adapter_model.safetensors" in str(p) for p in after)

    # As the README says: a model straight from the repo and its remote, without a clone.
    subprocess.run(["git", "commit", "-qam", "remote"], cwd=dest, check=True)
    dvc(tmp_path, "get", str(dest), "models/lora", "-o", str(tmp_path / "got"))
    assert (tmp_path / "got/adapter_model.safetensors").read_bytes() == before[
        (dest / "models/lora/adapter_model.safetensors").relative_to(dest)]


def test_readme_model_loading_snippets_run(demo_build, tmp_path):
    dest, *_ = demo_build
    readme = (sandbox.ROOT / "README.md").read_text()
    section = readme.split("### Use the trained models", 1)[1].split("\n### ", 1)[0]
    snippets = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(snippets) == 2
    outputs = []
    for code in snippets:
        proc = subprocess.run([sys.executable, "-c", code], cwd=dest, capture_output=True, text=True,
                              env=os.environ | sandbox.ENV)
        assert proc.returncode == 0, proc.stderr[-3000:]
        outputs.append(proc.stdout)
    assert outputs[0].startswith("The history of the city begins") and len(outputs[0].split()) > 10


def test_the_whole_pipeline_runs_a_tiny_llama_on_chat_data_and_a_wrong_lora_target_fails_first(tmp_path):
    """A Llama (BOS, grouped-query attention, a Llama-3-shaped chat template) on conversations:
    data.format messages through every stage under DVC."""
    dest = sandbox.make_sandbox(tmp_path / "llama", SETTINGS | {
        "model.name": "tiny-llama", "data.name": "assets/tiny-instruct/messages.jsonl", "data.format": "messages",
        "generate.test_prompts": 2})
    write_tiny_model("llama", dest / "tiny-llama")
    sandbox.repro_and_commit(dest)
    report = (dest / "metrics/report.md").read_text()
    assert report.startswith("# tiny-llama on messages.jsonl:") and "GPT-2" not in report
    assert "Fully fine-tuned tiny-llama" in report and "(down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj)" in report
    assert "BOS token `<|begin_of_text|>`" in report and "Instruction data, format `messages`" in report
    assert "### Answers to held-out test prompts" in report

    # GPT-2's layer name on a Llama: refused by check_params, before any stage runs, in one line.
    proc = dvc(dest, "exp", "run", "-S", "lora.target_modules=[c_attn]", check=False)
    assert proc.returncode != 0 and stages_run(proc) == {"check_params"}
    output = proc.stdout + proc.stderr
    errors = [line for line in output.splitlines() if line.startswith("check_params: error:")]
    assert len(errors) == 1 and "lora.target_modules: 'c_attn' matches no layer of this model" in errors[0]
    assert "-S 'lora.target_modules=[q_proj,v_proj]'" in errors[0] and "Traceback" not in output


def test_prompt_completion_data_runs_the_whole_pipeline(repo):
    dest, *_ = repo
    proc = dvc(dest, "exp", "run", "-S", "data.name=assets/tiny-instruct/prompt_completion.jsonl",
               "-S", "data.format=prompt_completion")
    assert stages_run(proc) == DATA_STAGES
    report = (dest / "metrics/report.md").read_text()
    assert "Instruction data, format `prompt_completion`: the answer is the completion and the EOS after it" in report
    assert "Training loss over the answer tokens alone (data.train_on_prompt: false)" in report
    assert "columns `prompt`, `completion`" in report
    ev = read_json(dest / "metrics/evaluate/full.json")["full"]
    assert ev["test_examples"] > 20 and "lo" in read_json(dest / "metrics/compare.json")["paired"]["full_vs_lora"]


def test_a_test_split_too_small_for_an_interval_gets_no_interval_and_no_verdict(repo):
    """One JSON Lines file of 140 articles: each a document, its test split (5%, carved) a handful of
    them, under the 20 independent units an interval needs; the general set, running text without
    articles, in 1,024-token chunks (the shipped size): 7 of them. The report calls no winner and
    names the units."""
    dest, *_ = repo
    override_file(dest / "params.yaml", {"data.name": "assets/tiny-jsonl/articles.jsonl", "data.text_column": "content",
                                         "evaluate.bootstrap_chunk": 1024})
    dvc(dest, "repro")
    compare = read_json(dest / "metrics/compare.json")
    documents = read_json(dest / "metrics/prepare.json")["corpus"]["test"]["documents"]
    assert 0 < documents < 20
    assert all(set(pair) == {"ratio", "chunks"} and pair["chunks"] == documents for pair in compare["paired"].values())
    assert all(pair["chunks"] == 7 for pair in compare["forgetting"]["tiny-general-test"].values())
    assert read_json(dest / "metrics/compare.info.json")["units"] == {"test": "documents", "tiny-general-test": "chunks"}
    report = (dest / "metrics/report.md").read_text()
    assert (f"The test split is too small to call a difference: it has {documents} documents, its independent units, "
            "and an interval needs at least 20") in report
    assert "the set is too small to call a difference: its scored tokens make 7 chunk(s) of 1,024 tokens" in report
    assert "No winner is called" in report and "no call: too few documents" in report
    assert "lower test perplexity than" not in report and "a tie on test perplexity" not in report
    assert "[no interval: too few units]" in report  # the perplexity columns give no interval either


def test_one_json_lines_file_runs_the_whole_pipeline_with_two_settings(repo):
    """As the README says: one export file, its text in a field of its own, nothing else set."""
    dest, *_ = repo
    proc = dvc(dest, "exp", "run", "-S", "data.name=assets/tiny-jsonl/articles.jsonl", "-S", "data.text_column=content")
    assert stages_run(proc) == DATA_STAGES
    corpus = read_json(dest / "metrics/prepare.json")["corpus"]
    assert sum(corpus[s]["documents"] for s in ("train", "validation", "test")) == 140
    report = (dest / "metrics/report.md").read_text()
    assert "corpus `assets/tiny-jsonl/articles.jsonl`, column `content`:" in report
    assert ("Split made here: validation and test carved out of the source's training rows by a keyed hash of each "
            "row's text (data.split_seed 42; validation 5% and test 5% of the rows on average") in report
    assert report.startswith("# tiny-gpt2 on articles.jsonl:")
    # generate.prompt auto: the panel opens held-out test articles of this export, not demo text.
    test_text = " ".join(json.loads(line)["content"] for line in (sandbox.ROOT / "assets/tiny-jsonl/articles.jsonl").open())
    prompts = [p["prompt"] for p in read_json(dest / "generations/lora.json")["prompts"]]
    assert len(prompts) == 3 and all(p in " ".join(test_text.split()) for p in prompts), prompts


def test_dora_reruns_only_the_lora_stages_and_the_report_names_it(repo):
    dest, *_ = repo
    proc = dvc(dest, "exp", "run", "-S", "lora.use_dora=true")
    assert stages_run(proc) == LORA_STAGES
    m = read_json(dest / "metrics/train_lora.json")["lora"]
    assert m["reload_max_abs_diff"] <= m["check_tolerance"] and m["merge_max_abs_diff"] <= m["check_tolerance"]
    report = (dest / "metrics/report.md").read_text()
    assert "DoRA fine-tuned tiny-gpt2" in report and "plus DoRA's magnitudes" in report
