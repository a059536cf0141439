"""Pinned Hub inputs and offline mode, against a local stand-in for the Hub (tests/hub_standin.py:
a loopback HTTP server answering the Hub API as the clients call it, serving small repos under the
shipped ids) and Hub caches laid out as the client writes them. Each case runs the real clients in
a fresh process whose environment the test sets whole (HF_ENDPOINT, HF_HOME, HF_HUB_OFFLINE), so
the caller's own exports change nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import PREPARE_ARGS, ROOT
from ftstudy.config import set_keys
from hub_standin import COMMITS, LAMBADA, MODEL, WIKITEXT, HubStandIn, study_repos

# One pytest-xdist worker runs this file: its module-scoped fixtures are built once.
pytestmark = pytest.mark.xdist_group("hub")

DATA = WIKITEXT


@pytest.fixture(scope="module")
def repos(tmp_path_factory):
    return study_repos(tmp_path_factory.mktemp("hub-repos"))


@pytest.fixture
def hub(repos):
    with HubStandIn(repos) as standin:
        yield standin


@pytest.fixture(scope="module")
def hub_endpoint(repos):
    with HubStandIn(repos) as standin:
        yield standin.url


def folder(tmp_path, overrides: dict | None = None) -> Path:
    """tmp_path with the shipped params.yaml, dotted `overrides` applied."""
    params = set_keys(yaml.safe_load((ROOT / "params.yaml").read_text()), overrides or {})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    return tmp_path


def clean_env(home: Path, **env) -> dict:
    """This process's environment without any HF_* or STUDY_* variable the caller exported, with
    HF_HOME at `home` and `env` added."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "STUDY_", "TRANSFORMERS_OFFLINE"))}
    return base | {"PYTHONPATH": str(ROOT), "HF_HOME": str(home)} | env


def run(cwd: Path, code_or_stage: list[str], **env) -> subprocess.CompletedProcess:
    base = clean_env(cwd / "hf-home", **env)
    return subprocess.run([sys.executable, *code_or_stage], cwd=cwd, env=base, capture_output=True, text=True,
                          timeout=120)


PROVENANCE = ["-c", "import json; from ftstudy.config import load_params; from stages.prepare import provenance; "
                    "print(json.dumps(provenance(load_params())))"]


def test_shipped_pins_and_a_branch_resolve_to_commits_with_a_note(tmp_path, hub_endpoint):
    proc = run(folder(tmp_path), PROVENANCE, HF_ENDPOINT=hub_endpoint)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    # The shipped model and WikiText revisions are commits: no note. LAMBADA ships its branch.
    assert lines[:-1] == [f"prepare: data.general[0].revision 'main' resolved to commit {'f' * 40}; pin it with "
                          f"-S 'data.general[0].revision={'f' * 40}'"]
    sources = json.loads(lines[-1])
    assert sources["model.name"] == {"name": MODEL, "revision": COMMITS[MODEL], "commit": COMMITS[MODEL], "license": "mit"}
    assert sources["data.name"]["commit"] == COMMITS[DATA]
    assert sources["data.general[0].name"] == {"name": LAMBADA, "revision": "main", "commit": "f" * 40, "license": None}


def test_an_unknown_revision_fails_in_seconds_naming_its_key(tmp_path, hub_endpoint):
    proc = run(folder(tmp_path, {"model.revision": "no-such-branch"}), ["-m", "stages.prepare", *PREPARE_ARGS],
               HF_ENDPOINT=hub_endpoint)
    assert proc.returncode == 1
    assert proc.stderr.splitlines()[0] == (f"prepare: error: model.revision: 'no-such-branch' is not a revision of "
                                           f"{MODEL} on the Hub; set a commit sha, tag or branch that it has")
    assert "Traceback" not in proc.stderr and not (tmp_path / "prep").exists()


def write_cache(home: Path, name: str, commit: str, files: dict[str, bytes], incomplete: bool = False) -> None:
    """A Hub cache entry as huggingface_hub lays it out: blobs, refs/main, a snapshot of links."""
    repo = home / "hub" / f"models--{name.replace('/', '--')}"
    (repo / "blobs").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for i, (file, content) in enumerate(files.items()):
        (repo / "blobs" / f"blob{i}").write_bytes(content)
        (snapshot / file).symlink_to(f"../../blobs/blob{i}")
    if incomplete:  # what an interrupted download leaves: the next file, half written
        (repo / "blobs" / "blob9.incomplete").write_bytes(b"\0" * 10)


CHECK = ["-c", "from ftstudy import hub; import sys; "
               f"item = hub.HubInput('model.name', {MODEL!r}, 'model', sys.argv[1]); print(hub.cached_commit(item)[0])"]


@pytest.mark.parametrize("case", ["complete", "interrupted", "no weights"])
def test_the_cache_counts_only_a_complete_download(tmp_path, case):
    files = {"config.json": b"{}", "model.safetensors": b"weights"}
    if case == "no weights":
        del files["model.safetensors"]
    write_cache(tmp_path / "hf-home", MODEL, COMMITS[MODEL], files, incomplete=case == "interrupted")
    for revision in (COMMITS[MODEL], "main", COMMITS[MODEL][:10]):
        proc = run(tmp_path, [*CHECK, revision], HF_HUB_OFFLINE="1")
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert proc.stdout.strip() == (COMMITS[MODEL] if case == "complete" else "None"), (case, revision)
    assert run(tmp_path, [*CHECK, "f" * 40], HF_HUB_OFFLINE="1").stdout.strip() == "None"  # another commit


def test_a_truncated_cache_entry_gets_the_offline_advice(tmp_path):
    write_cache(tmp_path / "hf-home", MODEL, COMMITS[MODEL], {"config.json": b"{}"}, incomplete=True)
    proc = run(folder(tmp_path), ["-m", "stages.prepare", *PREPARE_ARGS], HF_HUB_OFFLINE="1")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith(f"prepare: error: model.name: '{MODEL}' is a Hugging Face Hub id, and the Hub "
                                  "could not be reached (HF_HUB_OFFLINE is set) nor is it complete in the local cache")


PREPARE = ["-m", "stages.prepare", *PREPARE_ARGS]


def test_download_first_then_offline_serves_every_input_and_asks_the_hub_nothing(tmp_path, hub):
    """A cluster's login node downloads, its compute nodes run offline: the shipped params, the
    general set at a branch included, through the real clients and caches."""
    online = run(folder(tmp_path), PREPARE, HF_ENDPOINT=hub.url)
    assert online.returncode == 0, online.stderr[-3000:]
    first = json.loads((tmp_path / "prep/meta.json").read_text())
    asked = len(hub.requests)
    offline = run(tmp_path, PREPARE, HF_ENDPOINT=hub.url, HF_HUB_OFFLINE="1")
    assert offline.returncode == 0, offline.stderr[-3000:]
    assert hub.requests[asked:] == []  # offline mode never calls the Hub, though it is up
    assert (f"prepare: data.general[0].revision 'main' resolved to commit {COMMITS[LAMBADA]} (offline: the snapshot "
            f"the cache holds); pin it with -S 'data.general[0].revision={COMMITS[LAMBADA]}'") in offline.stdout
    again = json.loads((tmp_path / "prep/meta.json").read_text())
    assert again["splits"] == first["splits"] and again["inputs"] == first["inputs"]
    license = json.loads((tmp_path / "m/prepare.info.json").read_text())["inputs"]["model.name"]["license"]
    assert license == "mit"  # the card the online run cached
    assert "Traceback" not in offline.stderr


def test_offline_with_a_cold_cache_gives_the_advice_in_one_line_and_asks_nothing(tmp_path, hub):
    proc = run(folder(tmp_path), PREPARE, HF_ENDPOINT=hub.url, HF_HUB_OFFLINE="1")
    assert proc.returncode == 1 and hub.requests == []
    assert proc.stderr.splitlines()[0].startswith(
        f"prepare: error: model.name: '{MODEL}' is a Hugging Face Hub id, and the Hub could not be reached "
        "(HF_HUB_OFFLINE is set) nor is it complete in the local cache")
    assert "Traceback" not in proc.stderr and not (tmp_path / "prep").exists()


@pytest.mark.slow
def test_an_online_prepare_then_offline_repro_f_runs_every_stage(tmp_path, repos):
    """The whole pipeline through DVC on the shipped Hub ids (demo sizes): `dvc repro prepare`
    online against the stand-in (a login node downloading), then, with the stand-in stopped,
    `HF_HUB_OFFLINE=1 dvc repro -f` (a compute node)."""
    from conftest import SETTINGS
    from scripts import sandbox
    from test_pipeline import ALL_STAGES, stages_run

    hub_inputs = {"model.name": MODEL, "model.revision": COMMITS[MODEL], "data.name": DATA,
                  "data.revision": COMMITS[DATA], "data.config": "wikitext-2-raw-v1",
                  "data.general": [{"name": LAMBADA, "revision": "main", "config": "en", "split": "test",
                                   "text_column": "text"}]}
    dest = sandbox.make_sandbox(tmp_path / "sandbox", SETTINGS | hub_inputs)
    home = tmp_path / "hf-home"

    def repro(*args, **env):
        proc = subprocess.run(["dvc", "repro", *args], cwd=dest, capture_output=True, text=True,
                              env=clean_env(home, DVC_NO_ANALYTICS="1", **env))
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
        return proc

    with HubStandIn(repos) as standin:
        offline_env = {"HF_ENDPOINT": standin.url, "HF_HUB_OFFLINE": "1"}  # nothing listens there once it stops
        # The offline stages start warm, from a server with their environment, preloading meanwhile.
        with sandbox.warm_server(clean_env(home, **offline_env), export=False) as address:
            online = repro("prepare", HF_ENDPOINT=standin.url)
            tokens = json.loads((dest / "metrics/prepare.json").read_text())
            standin.stop()
            offline = repro("-f", **offline_env, FTSTUDY_WARM=address or "")
    assert stages_run(online) == {"prepare"}
    assert stages_run(offline) == ALL_STAGES and "Traceback" not in offline.stdout + offline.stderr
    assert json.loads((dest / "metrics/prepare.json").read_text()) == tokens
    inputs = json.loads((dest / "metrics/prepare.info.json").read_text())["inputs"]
    assert inputs["data.general[0].name"]["commit"] == COMMITS[LAMBADA]
    assert (dest / "metrics/report.md").read_text().startswith("# gpt2 on wikitext (wikitext-2-raw-v1):")
    # The model cards name the Hub base, its pinned commit and its license, and the test perplexity.
    from huggingface_hub import ModelCard

    test_ppl = json.loads((dest / "metrics/evaluate/full.json").read_text())["full"]["test_ppl"]
    card = ModelCard.load(dest / "cards/full/README.md")
    assert card.data.base_model == MODEL and card.data.base_model_revision == COMMITS[MODEL]
    assert card.data.license == "mit" and card.data.datasets == [DATA] and card.data.library_name == "transformers"
    assert card.data.eval_results[0].metric_value == pytest.approx(test_ppl, rel=1e-4)
    assert f"https://huggingface.co/{MODEL}" in card.text
