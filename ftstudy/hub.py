"""Hub inputs: each id resolved to the commit served for its revision, or a fast, clear failure.

`prepare` is the only stage that loads from the Hub (model.name, data.name, data.general). Before
it loads anything, `resolve` turns each Hub input's revision (a commit sha, a tag or a branch) into
the commit that will be served, like a lock file: asked from the Hub when it can be reached (an
unknown revision fails in seconds naming its key), else looked up in the local Hub cache with the
client's own cache scan (then the run goes on offline). An input that is neither reachable nor
complete in the cache (never downloaded, or a download that was interrupted) fails with one error
that names the key and the two ways on, instead of the clients' minute of retries and a long
traceback. The loaders then load exactly the resolved commits.
"""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass
from urllib.parse import urlparse

from ftstudy import warm
from ftstudy.errors import StudyError

# Files a model snapshot cannot do without; a dataset's files vary, so only its revision is checked.
MODEL_FILES = ("config.json",)
MODEL_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")


@dataclass(frozen=True)
class HubInput:
    """One input prepare reads from the Hub."""
    key: str               # the params key of its id: model.name, data.name, data.general[0].name
    name: str              # the Hub id
    repo_type: str         # "model" or "dataset"
    revision: str | None   # as asked: a commit sha, tag or branch; None means the main branch

    @property
    def revision_key(self) -> str:
        return self.key.removesuffix(".name") + ".revision"

    @property
    def asked(self) -> str:
        return self.revision or "main"


def offline() -> bool:
    """Whether the Hub clients are in offline mode (HF_HUB_OFFLINE, set by the user or by resolve)."""
    return os.environ.get("HF_HUB_OFFLINE", "0").strip().lower() in ("1", "true", "yes", "on")


def local_snapshot(name: str, repo_type: str, commit: str) -> str:
    """The local Hub cache's folder of `name` at `commit` (resolve found it complete)."""
    from huggingface_hub import snapshot_download

    return snapshot_download(name, repo_type=repo_type, revision=commit, local_files_only=True)


def hub_unreachable() -> str | None:
    """Why the Hugging Face Hub cannot be reached (offline mode, no DNS, no route), or None.
    One connection attempt of at most 3 s, instead of the client's own minute of retries."""
    if offline():
        return "HF_HUB_OFFLINE is set"
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=3).close()
    except OSError as e:
        return f"{url.hostname}: {e.strerror or e}"
    return None


def offline_advice(item: HubInput, reason: str) -> str:
    return (f"{item.key}: {item.name!r} is a Hugging Face Hub id, and the Hub could not be reached ({reason}) nor "
            f"is it complete in the local cache at {item.revision_key} {item.asked!r}. Either set {item.key} to a "
            "local folder or file (README: \"Your own model\", \"Your own data\"), or run the offline demo on the "
            "bundled assets: make demo")


def served_commit(item: HubInput) -> str:
    """The commit the Hub serves for the item's revision; errors name the key."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    api = HfApi()
    info = api.model_info if item.repo_type == "model" else api.dataset_info
    try:
        return info(item.name, revision=item.asked).sha
    except RevisionNotFoundError:
        raise StudyError(f"{item.revision_key}: {item.asked!r} is not a revision of {item.name} on the Hub; set a "
                         "commit sha, tag or branch that it has") from None
    except RepositoryNotFoundError:
        raise StudyError(f"{item.key}: {item.name!r} is not a {item.repo_type} on the Hub (or it is gated or "
                         "private and no token grants access)") from None


def card_license(item: HubInput, commit: str) -> str | None:
    """The license that the item's card (its README.md at `commit`) declares, or None where it has
    no card or declares none. Online the card is downloaded into the Hub cache, so that offline,
    where it is read from there, the license is still known."""
    import yaml
    from huggingface_hub import RepoCard, hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError

    try:
        path = hf_hub_download(item.name, "README.md", repo_type=item.repo_type, revision=commit,
                               local_files_only=offline())
        return RepoCard.load(path).data.to_dict().get("license")
    except (EntryNotFoundError, HfHubHTTPError, OSError, ValueError, yaml.YAMLError):  # no card, or unreadable
        return None


def cached_commit(item: HubInput) -> tuple[str | None, str]:
    """(the commit that the local Hub cache holds complete for the item's revision, or None when it
    was never downloaded or a download was interrupted: a blob still *.incomplete, or a model
    snapshot without its config or weights; how it was found), from the Hub client's own cache
    scan. A branch or tag that the cache has no ref for (the loaders download by commit, which
    records none) resolves to the complete snapshot the cache holds, the newest if several."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        cache = scan_cache_dir()
    except CacheNotFound:
        return None, ""
    repo = next((r for r in cache.repos if r.repo_id == item.name and r.repo_type == item.repo_type), None)
    if repo is None or any((repo.repo_path / "blobs").glob("*.incomplete")):
        return None, ""

    def complete(rev) -> bool:
        files = {f.file_name for f in rev.files}
        return item.repo_type != "model" or (set(MODEL_FILES) <= files and bool(files & set(MODEL_WEIGHTS)))

    is_sha = re.fullmatch(r"[0-9a-f]{7,40}", item.asked) is not None
    for rev in repo.revisions:
        if item.asked in rev.refs or (is_sha and rev.commit_hash.startswith(item.asked)):
            return (rev.commit_hash if complete(rev) else None), "its ref in the cache"
    held = sorted((rev for rev in repo.revisions if complete(rev)), key=lambda rev: rev.last_modified)
    if is_sha or not held:
        return None, ""
    how = "the snapshot the cache holds" if len(held) == 1 else f"the newest of the {len(held)} snapshots the cache holds"
    return held[-1].commit_hash, how


def resolve(items: list[HubInput]) -> dict[str, dict]:
    """key -> {"name", "revision" (asked), "commit" (served), "license" (its card's), "from" (where
    the commit was learnt)} for every Hub input. When the Hub is
    down, the clients are switched to offline mode first (before they are imported), so they read
    the cache without retrying; raises StudyError for the first input that is neither reachable
    nor complete in the cache."""
    if not items:
        return {}
    reason = hub_unreachable()
    if reason is not None:  # before huggingface_hub is first imported: it reads these once, at import
        warm.start_cold("offline mode, which the Hub clients read at import", imported="huggingface_hub")
        os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    resolved = {}
    for item in items:
        commit, how = (served_commit(item), "the Hub") if reason is None else cached_commit(item)
        if commit is None:
            raise StudyError(offline_advice(item, reason))
        resolved[item.key] = {"name": item.name, "revision": item.asked, "commit": commit,
                              "license": card_license(item, commit), "from": how}
    return resolved
