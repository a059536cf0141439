"""Stage prepare: data.* and model.* -> token files, their meta, a pretrained snapshot, token counts
and the inputs' provenance.

Every Hub input (model.name, data.name, each data.general name) is first resolved from its revision
to the commit served (ftstudy.hub), then loaded at that commit. Writes --out/{train,validation,
test}.bin, one general-<name>.bin per data.general source, and meta.json (with the provenance, BOS
and row separators); --pretrained (save_pretrained snapshot of model.name, so later stages never
reach the Hub); --metrics (token, byte, document and removed-duplicate counts per split) and
--info (each input's revision asked and commit served, or a local source's content hash; the text
column; how the splits were made).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ftstudy import hub, modeling
from ftstudy.config import Params, is_local, load_params
from ftstudy.data import splits, token_files
from ftstudy.errors import run_stage
from ftstudy.outputs import atomic_dir, write_json


def inputs(p: Params) -> list[hub.HubInput]:
    """Every input of the study, as (key, name, repo_type, revision); local sources among them too."""
    items = [hub.HubInput("model.name", p.model.name, "model", p.model.revision),
             hub.HubInput("data.name", p.data.name, "dataset", p.data.revision)]
    return items + [hub.HubInput(f"data.general[{i}].name", g.name, "dataset", g.revision)
                    for i, g in enumerate(p.data.general)]


def provenance(p: Params) -> dict:
    """key -> {"name", "revision", "commit", "license"}: Hub inputs resolved to the commit served
    (a branch or tag gets a one-line note with the commit and how to pin it); a local source has
    none of them but the hash of its content ("content_sha256"), and a revision or config given
    for one is ignored with a note (the shipped ones belong to the Hub's WikiText, so
    `-S data.name=my.jsonl` alone works)."""
    items = inputs(p)
    configs = {"data.name": p.data.config} | {f"data.general[{i}].name": g.config for i, g in enumerate(p.data.general)}
    for item in items:
        if is_local(item.name):
            ignored = [f"{item.revision_key} {item.revision!r}"] if item.revision is not None else []
            if configs.get(item.key) is not None:
                ignored.append(f"{item.key.removesuffix('.name')}.config {configs[item.key]!r}")
            if ignored:
                print(f"prepare: {' and '.join(ignored)} ignored: {item.name} is a local "
                      f"{'file' if Path(item.name).is_file() else 'folder'}")
    resolved = hub.resolve([item for item in items if not is_local(item.name)])
    for item in items:
        if item.key in resolved and not (commit := resolved[item.key]["commit"]).startswith(item.asked):
            offline = "" if resolved[item.key]["from"] == "the Hub" else f" (offline: {resolved[item.key]['from']})"
            print(f"prepare: {item.revision_key} {item.asked!r} resolved to commit {commit}{offline}; pin it with "
                  f"-S '{item.revision_key}={commit}'")
    return {item.key: {k: v for k, v in resolved[item.key].items() if k != "from"} if item.key in resolved
            else {"name": item.name, "revision": None, "commit": None, "content_sha256": token_files.content_hash(item.name)}
            for item in items}


def main() -> None:
    ap = argparse.ArgumentParser(description="Tokenize the corpus; run by dvc.yaml stage prepare")
    ap.add_argument("--out", required=True, help="folder for the token files")
    ap.add_argument("--pretrained", required=True, help="folder for the pretrained snapshot")
    ap.add_argument("--metrics", required=True, help="token-count metrics JSON")
    ap.add_argument("--info", required=True, help="inputs' provenance JSON (revision asked, commit served)")
    args = ap.parse_args()
    p = load_params()
    inputs = provenance(p)
    commits = {key: s["commit"] for key, s in inputs.items()}
    model_commit = commits["model.name"]
    modeling.check_context(p.model.name, p.data.block_size, model_commit)
    tokenizer = modeling.load_tokenizer(p.model.name, model_commit)
    with atomic_dir(args.out) as tmp:
        # The meta pins what was read; the license (the card's, None where it declares none) is for the info alone.
        pinned = {key: {k: v for k, v in item.items() if k != "license"} for key, item in inputs.items()}
        meta = splits.tokenize_sources(p, tmp, tokenizer, commits) | {"inputs": pinned}
        write_json(tmp / token_files.META_FILE, meta)
    with atomic_dir(args.pretrained) as tmp:
        modeling.snapshot(p.model.name, tmp, model_commit)
    counted = ("tokens", "bytes", "documents", "duplicates_removed", "answer_tokens", "truncated", "dropped_no_answer",
               "answers_cut")
    write_json(args.metrics, {"corpus": {s: {k: v[k] for k in counted if k in v} for s, v in meta["splits"].items()}})
    write_json(args.info, {"inputs": inputs, "format": meta["format"], "columns": meta["columns"],
                           "split": meta["split"], "made": {s: v["made"] for s, v in meta["splits"].items()}})
    total = sum(v["tokens"] for v in meta["splits"].values())
    print(f"prepare: {total:,} tokens ({meta['dtype']}); wrote {args.out}, {args.pretrained}, {args.metrics}, "
          f"{args.info}")


if __name__ == "__main__":
    run_stage(main)
