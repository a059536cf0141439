"""Pinned Hub inputs, against a local stand-in for the Hub (a loopback HTTP server answering the
Hub API's revision lookups as the Hub does) and a Hub cache laid out as the client writes it.
Each case runs the real client in a fresh process, where HF_ENDPOINT and HF_HOME take effect."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from conftest import PREPARE_ARGS, ROOT
from ftstudy.config import set_keys

MODEL, DATA, LAMBADA = "openai-community/gpt2", "Salesforce/wikitext", "EleutherAI/lambada_openai"
COMMITS = {MODEL: "607a30d783dfa663caf39e06633721c8d4cfcd7e", DATA: "b08601e04326c79dfdd32d625aee71d232d685c3",
           LAMBADA: "f" * 40}


class StandIn(BaseHTTPRequestHandler):
    """GET /api/{models,datasets}/<id>/revision/<rev>: the commit for a known id at main or at its
    own commit (or a prefix of it); the Hub's RevisionNotFound answer for any other revision."""

    def do_GET(self):  # noqa: N802 (http.server's name)
        parts = self.path.split("?")[0].split("/")
        name, revision = "/".join(parts[3:-2]), parts[-1]
        commit = COMMITS.get(name)
        if commit is not None and (revision == "main" or commit.startswith(revision)):
            self._answer(200, {"id": name, "sha": commit, "siblings": []})
        else:
            self._answer(404, {"error": f"Invalid rev id: {revision}"}, {"X-Error-Code": "RevisionNotFound"})

    def _answer(self, status: int, body: dict, headers: dict | None = None):
        data = json.dumps(body).encode()
        self.send_response(status)
        for k, v in {"Content-Type": "application/json", "Content-Length": str(len(data)), **(headers or {})}.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def hub_endpoint():
    server = ThreadingHTTPServer(("127.0.0.1", 0), StandIn)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def folder(tmp_path, overrides: dict | None = None) -> Path:
    """tmp_path with the shipped params.yaml, dotted `overrides` applied."""
    params = set_keys(yaml.safe_load((ROOT / "params.yaml").read_text()), overrides or {})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    return tmp_path


def run(cwd: Path, code_or_stage: list[str], **env) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "STUDY_"))}
    base |= {"PYTHONPATH": str(ROOT), "HF_HOME": str(cwd / "hf-home")} | env
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
    assert sources["model.name"] == {"name": MODEL, "revision": COMMITS[MODEL], "commit": COMMITS[MODEL]}
    assert sources["data.name"]["commit"] == COMMITS[DATA]
    assert sources["data.general[0].name"] == {"name": LAMBADA, "revision": "main", "commit": "f" * 40}


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
               f"item = hub.HubInput('model.name', {MODEL!r}, 'model', sys.argv[1]); print(hub.cached_commit(item))"]


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
