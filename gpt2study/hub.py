"""Reaching the Hugging Face Hub, or failing fast when it cannot be reached.

`prepare` is the only stage that loads from the Hub (model.name, data.name, data.general). Before
it does, `require` checks each hub id: reachable, or already in the local cache (then the run goes
on offline); otherwise one error names the key and the two ways on, in seconds instead of the
clients' minute of retries and a long traceback.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from gpt2study.errors import StudyError


def hub_unreachable() -> str | None:
    """Why the Hugging Face Hub cannot be reached (offline mode, no DNS, no route), or None.
    One connection attempt of at most 3 s, instead of the client's own minute of retries."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return "HF_HUB_OFFLINE is set"
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=3).close()
    except OSError as e:
        return f"{url.hostname}: {e.strerror or e}"
    return None


def offline_advice(key: str, value: str, reason: str) -> str:
    return (f"{key}: {value!r} is a Hugging Face Hub id, and the Hub could not be reached ({reason}) nor is it "
            f"in the local cache. Either set {key} to a local folder (README: \"A local model or dataset\"), "
            "or run the offline demo on the bundled assets: make demo")


def _cached(name: str, repo_type: str) -> bool:
    from huggingface_hub.constants import HF_HUB_CACHE

    return (Path(HF_HUB_CACHE) / f"{repo_type}s--{name.replace('/', '--')}").is_dir()


def require(ids: list[tuple[str, str, str]]) -> None:
    """ids: (params key, hub id, "model" or "dataset"). Raises StudyError for the first id that is
    neither reachable nor cached; if the Hub is down but all are cached, switches the clients to
    offline mode (before they are imported), so they read the cache without retrying."""
    if not ids or (reason := hub_unreachable()) is None:
        return
    for key, name, repo_type in ids:
        if not _cached(name, repo_type):
            raise StudyError(offline_advice(key, name, reason))
    os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
