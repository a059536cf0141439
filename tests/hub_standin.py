"""A local stand-in for the Hugging Face Hub: a loopback HTTP server answering the parts of the Hub
API that huggingface_hub, transformers and datasets call to download a model or a dataset at a
revision (repo info, file tree, paths-info, file resolve), from repos held in memory. Each repo has
one commit, served for `main` and for that commit (or a 7+ character prefix of it). Every request
is recorded, so a test can assert that offline mode asked nothing.

Nothing here fakes a result: the real clients talk HTTP to it, download, cache and load files as
they would from the Hub; only the files are small.
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit


@dataclass
class HubRepo:
    kind: str                  # "model" or "dataset"
    repo_id: str               # org/name
    commit: str                # the one commit, 40 hex digits
    files: dict[str, bytes] = field(default_factory=dict)

    @classmethod
    def from_folder(cls, kind: str, repo_id: str, commit: str, folder: Path) -> HubRepo:
        files = {str(p.relative_to(folder)): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}
        return cls(kind, repo_id, commit, files)

    @property
    def card(self) -> dict | None:
        """The card's metadata (its README.md's YAML front matter), as the repo info gives it (cardData)."""
        import yaml

        text = self.files.get("README.md", b"").decode()
        return yaml.safe_load(text.split("---")[1]) if text.startswith("---") else None

    def resolve(self, revision: str) -> str | None:
        if revision == "main" or (len(revision) >= 7 and self.commit.startswith(revision)):
            return self.commit
        return None

    def entries(self, prefix: str, recursive: bool) -> list[dict]:
        """The tree below `prefix`, as the Hub's tree API lists it: files and folders."""
        prefix = prefix.strip("/")
        out, folders = [], set()
        for path, content in self.files.items():
            if prefix and not path.startswith(prefix + "/"):
                continue
            rest = path[len(prefix) + 1:] if prefix else path
            parts = rest.split("/")
            for depth in range(1, len(parts)):
                if depth > 1 and not recursive:
                    break
                folders.add("/".join(([prefix] if prefix else []) + parts[:depth]))
            if recursive or len(parts) == 1:
                out.append(self.entry(path))
        return [{"type": "directory", "oid": _sha1(d.encode()), "size": 0, "path": d} for d in sorted(folders)] + out

    def entry(self, path: str) -> dict:
        content = self.files[path]
        return {"type": "file", "oid": _git_blob_sha(content), "size": len(content), "path": path}


def _sha1(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


def _git_blob_sha(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class HubStandIn:
    """with HubStandIn(repos) as hub: ... hub.url is the HF_ENDPOINT; hub.requests the paths asked."""

    def __init__(self, repos: list[HubRepo]):
        self.repos = {(r.kind, r.repo_id): r for r in repos}
        self.requests: list[str] = []
        standin = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's names)
                standin._answer(self, head=False)

            def do_HEAD(self):  # noqa: N802
                standin._answer(self, head=True)

            def do_POST(self):  # noqa: N802
                standin._answer(self, head=False)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> HubStandIn:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    # -- the API ------------------------------------------------------------------------------

    def _answer(self, h: BaseHTTPRequestHandler, head: bool) -> None:
        self.requests.append(f"{h.command} {h.path}")
        url = urlsplit(h.path)
        parts = [unquote(p) for p in url.path.strip("/").split("/")]
        query = parse_qs(url.query)
        body = h.rfile.read(int(h.headers.get("Content-Length") or 0)) if h.command == "POST" else b""
        if parts[:1] == ["api"] and len(parts) >= 4 and parts[1] in ("models", "datasets"):
            return self._api(h, parts[1][:-1], "/".join(parts[2:4]), parts[4:], query, body)
        kind = "model"
        if parts[:1] == ["datasets"]:
            kind, parts = "dataset", parts[1:]
        if len(parts) >= 5 and parts[2] == "resolve":
            return self._resolve(h, kind, "/".join(parts[:2]), parts[3], "/".join(parts[4:]), head)
        self._send(h, 404, {"error": "not found"}, {"X-Error-Code": "EntryNotFound"})

    def _repo(self, h, kind: str, repo_id: str, revision: str) -> tuple[HubRepo | None, str | None]:
        repo = self.repos.get((kind, repo_id))
        if repo is None:
            self._send(h, 404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
            return None, None
        commit = repo.resolve(revision)
        if commit is None:
            self._send(h, 404, {"error": f"Invalid rev id: {revision}"}, {"X-Error-Code": "RevisionNotFound"})
            return None, None
        return repo, commit

    def _api(self, h, kind: str, repo_id: str, rest: list[str], query: dict, body: bytes) -> None:
        if not rest or rest[0] == "revision":
            repo, commit = self._repo(h, kind, repo_id, rest[1] if len(rest) > 1 else "main")
            if repo is not None:
                self._send(h, 200, {"id": repo_id, "sha": commit, "private": False, "disabled": False, "gated": False,
                                    "lastModified": "2024-01-01T00:00:00.000Z", "tags": [], "downloads": 0,
                                    "likes": 0, "siblings": [{"rfilename": p} for p in repo.files],
                                    **({"cardData": repo.card} if repo.card else {})})
            return
        if rest[0] == "tree" and len(rest) >= 2:
            repo, commit = self._repo(h, kind, repo_id, rest[1])
            if repo is not None:
                recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
                self._send(h, 200, repo.entries("/".join(rest[2:]), recursive))
            return
        if rest[0] == "paths-info" and len(rest) >= 2:
            repo, commit = self._repo(h, kind, repo_id, rest[1])
            if repo is None:
                return
            asked = _paths(h.headers.get("Content-Type", ""), body)
            found = []
            for path in asked:
                path = path.strip("/")
                if path in repo.files:
                    found.append(repo.entry(path))
                elif any(p.startswith(path + "/") for p in repo.files):
                    found.append({"type": "directory", "oid": _sha1(path.encode()), "size": 0, "path": path})
            self._send(h, 200, found)
            return
        self._send(h, 404, {"error": "not found"}, {"X-Error-Code": "EntryNotFound"})

    def _resolve(self, h, kind: str, repo_id: str, revision: str, path: str, head: bool) -> None:
        repo, commit = self._repo(h, kind, repo_id, revision)
        if repo is None:
            return
        if path not in repo.files:
            self._send(h, 404, {"error": f"{path} not found"}, {"X-Error-Code": "EntryNotFound",
                                                                 "X-Repo-Commit": commit})
            return
        content = repo.files[path]
        h.send_response(200)
        for k, v in {"Content-Type": "application/octet-stream", "Content-Length": str(len(content)),
                     "ETag": f'"{_git_blob_sha(content)}"', "X-Repo-Commit": commit, "Accept-Ranges": "bytes"}.items():
            h.send_header(k, v)
        h.end_headers()
        if not head:
            h.wfile.write(content)

    @staticmethod
    def _send(h, status: int, body, headers: dict | None = None) -> None:
        data = json.dumps(body).encode()
        h.send_response(status)
        for k, v in {"Content-Type": "application/json", "Content-Length": str(len(data)), **(headers or {})}.items():
            h.send_header(k, v)
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(data)


def _paths(content_type: str, body: bytes) -> list[str]:
    """The `paths` of a paths-info request: a form (paths=a&paths=b) or JSON ({"paths": [...]})."""
    if "json" in content_type:
        return list(json.loads(body or b"{}").get("paths", []))
    return parse_qs(body.decode()).get("paths", [])


# The shipped params' Hub inputs, each at the commit params.yaml pins (LAMBADA ships its branch).
MODEL, WIKITEXT, LAMBADA = "openai-community/gpt2", "Salesforce/wikitext", "EleutherAI/lambada_openai"
COMMITS = {MODEL: "607a30d783dfa663caf39e06633721c8d4cfcd7e", WIKITEXT: "b08601e04326c79dfdd32d625aee71d232d685c3",
           LAMBADA: "f" * 40}


def _parquet(rows: list[str]) -> bytes:
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(pa.table({"text": rows}), buf)
    return buf.getvalue()


def _card(config: str | list[str], splits: dict[str, str]) -> bytes:
    """A dataset card declaring each config (the same data files for each)."""
    files = "".join(f"  - split: {split}\n    path: {path}\n" for split, path in splits.items())
    configs = [config] if isinstance(config, str) else config
    return ("---\nconfigs:\n" + "".join(f"- config_name: {c}\n  data_files:\n{files}" for c in configs) + "---\n").encode()


def study_repos(work: Path) -> list[HubRepo]:
    """The three repos of the shipped params, small: a tiny random GPT-2 (1,024-token context,
    the bundled tiny tokenizer) as openai-community/gpt2; the tiny WikiText-format corpus as
    Salesforce/wikitext's wikitext-2-raw-v1 parquet files (a line a row, as on the Hub); the tiny
    general passages as EleutherAI/lambada_openai's `en` test split, and as its `default` one, which
    lm-eval's lambada_openai task reads."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from ftstudy.synthetic import ASSETS, tiny_tokenizer

    tokenizer = tiny_tokenizer("gpt2")
    torch.manual_seed(0)
    model_dir = work / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=1024, vocab_size=len(tokenizer),
                               bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
                    ).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    (model_dir / "README.md").write_text("---\nlicense: mit\n---\n# GPT-2\n")  # as GPT-2's card says
    wiki = {"README.md": _card("wikitext-2-raw-v1", {s: f"wikitext-2-raw-v1/{s}-*" for s in ("train", "validation", "test")})}
    for split, raw in (("train", "wiki.train.raw"), ("validation", "wiki.valid.raw"), ("test", "wiki.test.raw")):
        lines = (ASSETS / "tiny-wikitext" / raw).read_text(encoding="utf-8").splitlines(keepends=True)
        wiki[f"wikitext-2-raw-v1/{split}-00000-of-00001.parquet"] = _parquet(lines)
    passages = (ASSETS / "tiny-general" / "test.txt").read_text(encoding="utf-8").splitlines()
    lambada = {"README.md": _card(["default", "en"], {"test": "en/test-*"}),
               "en/test-00000-of-00001.parquet": _parquet([p for p in passages if p.strip()])}
    return [HubRepo.from_folder("model", MODEL, COMMITS[MODEL], model_dir),
            HubRepo("dataset", WIKITEXT, COMMITS[WIKITEXT], wiki),
            HubRepo("dataset", LAMBADA, COMMITS[LAMBADA], lambada)]
