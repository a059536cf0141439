"""make bench: our training loop (full and LoRA) side by side with the HF Trainer default path, and
our `prepare` tokenization side by side with run_clm's datasets.map + group_texts path.

    python -m scripts.bench [--out bench-results.json] [--prepare-mb 540] [--prepare-format text|jsonl]
                            [--skip-prepare | --skip-training]
    python -m scripts.bench --loss     # train.loss: the model's own vs chunked, memory and tokens/s
    python -m scripts.bench --live     # a logged step's cost: Accelerate's DVCLive tracker vs ours
    python -m scripts.bench --checkpointing  # gradient checkpointing off vs on, GPT-2 124M real shapes

On a GPU it trains the GPT-2 124M architecture at random init (the compute is the same as the
real weights'), 1024-token blocks; on CPU the bundled tiny GPT-2, 128-token blocks. Every path
trains on the same random token stream; each runs in its own process, so peak memory is its own.
Our paths run the real stage code (`python -m stages.train_*`, as dvc.yaml does for one process). Steady-state tokens/s
leaves out each path's first log interval (compilation and warm-up), reported apart.

The prepare comparison tokenizes a synthetic corpus of --prepare-mb MB (the tiny corpus repeated:
WikiText-format lines, or with --prepare-format jsonl one JSON Lines export, its text in a
`content` field) with GPT-2's real tokenizer (assets/gpt2-tokenizer).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from ftstudy import cores
from ftstudy.data.token_files import token_dtype
from ftstudy.synthetic import ASSETS, ROOT, local_params, no_dropout, write_gpt2_124m, write_params

WARMUP_STEPS = 10  # the log interval whose time is reported as warm-up


GPU_SHAPE = {"model": "GPT-2 124M (random init)", "config": {}, "block": 1024, "batch": 16, "hf_batch": 8,
             "tokens": 2_457_600}
CPU_SHAPE = {"model": "tiny GPT-2 (assets/tiny-gpt2)", "config": None, "block": 128, "batch": 8, "hf_batch": 8,
             "tokens": 204_800}


def setup(work: Path, shape: dict, snapshot: Path | None = None) -> None:
    """Write a snapshot (`shape["config"]`: GPT2Config overrides for a random-init GPT-2 with the
    real tokenizer, or None for the bundled tiny model; or hard links to the files of `snapshot`,
    one written before) and a prepared folder of random tokens."""
    if snapshot is not None:
        shutil.copytree(snapshot, work / "pre", copy_function=os.link)
    elif shape["config"] is None:
        shutil.copytree(ASSETS / "tiny-gpt2", work / "pre")
    else:
        write_gpt2_124m(work / "pre", **shape["config"])
    vocab = json.loads((work / "pre" / "config.json").read_text())["vocab_size"]
    prep = work / "prep"
    prep.mkdir()
    rng, dtype = np.random.default_rng(0), token_dtype(vocab)
    sizes = {"train": shape["tokens"] + shape["block"], "validation": 4 * shape["block"], "test": 4 * shape["block"]}
    for split, n in sizes.items():
        rng.integers(0, vocab, n).astype(dtype).tofile(prep / f"{split}.bin")
    meta = {"dtype": dtype.str, "vocab_size": vocab, "tokenizer": "bench", "source": "random", "config": None,
            "inputs": {"model.name": {"name": str(work / "pre"), "revision": None, "commit": None}},
            "splits": {s: {"tokens": n, "bytes": n} for s, n in sizes.items()}}
    (prep / "meta.json").write_text(json.dumps(meta))


def bench_params(work: Path, shape: dict, compile_: str | bool = "auto", loss: str = "chunked", **overrides) -> None:
    """params.yaml in `work` for the training paths: one epoch over the prepared random tokens
    (dotted `overrides` applied)."""
    log_every = shape.get("log_every", WARMUP_STEPS)
    write_params(work, local_params(work / "pre", work, **{
        "data.block_size": shape["block"], "evaluate.stride": shape["block"] // 2, "train.epochs": 1,
        "train.batch_size": shape["batch"], "train.grad_accum": 1, "train.warmup_steps": min(10, log_every),
        "train.log_every": log_every, "train.compile": compile_, "train.loss": loss,
        "train.trackers": []} | overrides))  # trackers as HF's report_to=[]


def ours(work: Path, method: str, tag: str, label: str | None = None, check: bool = True) -> dict | None:
    """Our stage's training run in its own process, as a table row; with `check` off, None when
    it ran out of GPU memory (any other failure still stops the bench)."""
    cmd = [sys.executable, "-m", f"stages.train_{method}",
           "--data", "prep", "--base", "pre", "--out", f"out-{tag}", "--metrics", f"{tag}.json",
           "--info", f"{tag}.info.json", "--plots", f"plots-{tag}", "--live", f"live-{tag}", "--checkpoints", "ckpt"]
    # As dvc.yaml runs it for one process (ftstudy.train.launching). The HF Trainer path gets torch's
    # default threads (one per core this process may run on), so ours gets the same rather than
    # choosing by the load; not os.cpu_count(), which would put two threads on each core of a pinned run.
    threads = os.environ.get("OMP_NUM_THREADS", str(len(cores.affinity_cores())))
    env = os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": threads}
    proc = subprocess.run(cmd, cwd=work, env=env, stderr=None if check else subprocess.PIPE, text=True)
    if proc.returncode != 0:
        if not check and "out of GPU memory" in proc.stderr:
            return None
        raise SystemExit(f"bench: {' '.join(cmd)} failed ({proc.returncode}){'' if check else ':' + proc.stderr[-3000:]}")
    m = json.loads((work / f"{tag}.json").read_text())[method] | json.loads((work / f"{tag}.info.json").read_text())
    label = label or f"ours, {method}" + (", eager" if tag.endswith("eager") else "")
    return {"path": label, "batch": m["global_batch"], "loss": m["loss"], "tokens": m["tokens"],
            "tokens_per_s": m["tokens_per_s"], "warmup_s": m["warmup_s"], "mfu": m.get("mfu"),
            "peak_mem_gib": m["peak_mem_gib"], "peak_mem_reserved_gib": m.get("peak_mem_reserved_gib"),
            "final_loss": m["final_train_loss"], "precision": m["precision"], "compiled": m["compiled"],
            "device": m["device"]}


def hf_trainer(work: Path, shape: dict) -> dict:
    """The HF Trainer default path: fp32, batch 8; in its own process."""
    out = work / "hf.json"
    subprocess.run([sys.executable, "-m", "scripts.bench", "--_hf-trainer", str(work), json.dumps(shape), str(out)],
                   cwd=ROOT, check=True)
    return json.loads(out.read_text())


def _hf_trainer_child(work: Path, shape: dict, out: Path) -> None:
    import resource

    import torch
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    block, batch = shape["block"], shape["hf_batch"]
    tokens = np.fromfile(work / "prep/train.bin", dtype=json.loads((work / "prep/meta.json").read_text())["dtype"])
    blocks = torch.from_numpy(tokens[: len(tokens) // block * block].astype(np.int64)).view(-1, block)

    class Blocks(torch.utils.data.Dataset):
        def __len__(self):
            return len(blocks)

        def __getitem__(self, i):
            return {"input_ids": blocks[i], "labels": blocks[i]}

    marks = {}

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            marks[state.global_step] = time.perf_counter()

    steps = shape["tokens"] // (batch * block)
    args = TrainingArguments(output_dir=str(work / "hf"), per_device_train_batch_size=batch, max_steps=steps,
                             report_to=[], save_strategy="no", logging_steps=10**9, disable_tqdm=True)
    model = AutoModelForCausalLM.from_pretrained(work / "pre")
    start = time.perf_counter()
    Trainer(model=model, args=args, train_dataset=Blocks(), callbacks=[Clock()]).train()
    steady = (steps - WARMUP_STEPS) * batch * block / (marks[steps] - marks[WARMUP_STEPS])
    from ftstudy import runtime

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    memory = runtime.peak_memory(device) if device.type == "cuda" else {
        "peak_mem_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 4)}
    peak = runtime.peak_flops(runtime.device_name(device))
    fpt = runtime.flops_per_token(model.config, *runtime.matmul_params(model), block)
    mfu = None if peak is None else round(steady * fpt / peak, 4)
    out.write_text(json.dumps({"path": "HF Trainer defaults", "tokens": steps * batch * block, "tokens_per_s": round(steady, 1),
                               "warmup_s": round(marks[WARMUP_STEPS] - start, 3), "mfu": mfu,
                               "peak_mem_gib": memory["peak_mem_gib"],
                               "peak_mem_reserved_gib": memory.get("peak_mem_reserved_gib"), "final_loss": None,
                               "precision": "fp32", "compiled": False}))


def corpus(path: Path, mb: int, fmt: str) -> None:
    """About `mb` MB of the tiny corpus repeated: WikiText-format lines (text), or the bundled
    one-file export's articles as JSON Lines records with the text in `content` (jsonl)."""
    if fmt == "text":
        piece = (ASSETS / "tiny-wikitext" / "wiki.train.raw").read_bytes()
    else:
        piece = (ASSETS / "tiny-jsonl" / "articles.jsonl").read_bytes()
    with open(path, "wb") as f:
        for _ in range(max(1, mb * 2**20 // len(piece))):
            f.write(piece)


def _prepare_child(which: str, path: Path, work: Path, out: Path) -> None:
    import resource

    from ftstudy import modeling
    from ftstudy.data import sources, splits

    tok = modeling.load_tokenizer(ASSETS / "gpt2-tokenizer")  # GPT-2's real BPE
    column = "content" if path.suffix == ".jsonl" else "text"
    start = time.perf_counter()
    if which == "ours":  # prepare's own reading and tokenizing, into one token file
        writer = splits.SplitWriter(work / "train.bin", np.dtype("<u2"), None)
        source = sources.source_splits(str(path), None, None, sources.text_field(column))["train"]
        splits.tokenize_stream(source, tok, lambda *_: writer, [writer])
        n = writer.close()["tokens"]
    else:  # run_clm: load_dataset -> map(tokenize) -> map(group_texts), one process (its default)
        import datasets

        if column == "text":
            raw = datasets.load_dataset("text", data_files={"train": str(path)}, keep_linebreaks=True,
                                        cache_dir=str(work / "hf-cache"))["train"]
        else:
            raw = datasets.load_dataset("json", data_files={"train": str(path)}, cache_dir=str(work / "hf-cache"))["train"]
        tokenized = raw.map(lambda ex: tok(ex[column]), batched=True, remove_columns=raw.column_names)

        def group_texts(examples, block=1024):
            joined = {k: [t for row in v for t in row] for k, v in examples.items()}
            total = len(joined["input_ids"]) // block * block
            grouped = {k: [v[i:i + block] for i in range(0, total, block)] for k, v in joined.items()}
            grouped["labels"] = list(grouped["input_ids"])
            return grouped

        n = sum(len(x) for x in tokenized.map(group_texts, batched=True)["input_ids"])
    seconds = time.perf_counter() - start
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    out.write_text(json.dumps({"path": "ours (prepare)" if which == "ours" else "run_clm (datasets.map + group_texts)",
                               "seconds": round(seconds, 2), "tokens": n, "tokens_per_s": round(n / seconds),
                               "peak_rss_gib": round(rss, 3)}))


def bench_prepare(mb: int, fmt: str, work: Path) -> list[dict]:
    path = work / ("corpus.raw" if fmt == "text" else "corpus.jsonl")
    corpus(path, mb, fmt)
    size = path.stat().st_size / 2**20
    rows = []
    for which in ("ours", "run_clm"):
        out = work / f"prep-{which}.json"
        subprocess.run([sys.executable, "-m", "scripts.bench", "--_prepare", which, str(path), str(work), str(out)],
                       cwd=ROOT, check=True)
        r = json.loads(out.read_text())
        rows.append(r | {"format": fmt, "mb": round(size, 1), "mb_per_s": round(size / r["seconds"], 2)})
        shutil.rmtree(work / "hf-cache", ignore_errors=True)
    return rows


def bench_training(work: Path, cuda: bool, repeats: int) -> dict:
    """Our full and LoRA paths and the HF Trainer path on the same tokens, in alternating rounds."""
    work.mkdir()
    shape = GPU_SHAPE if cuda else CPU_SHAPE
    setup(work, shape)
    # Rounds alternate the paths and each path's median round is reported: this machine's
    # speed drifts, and a path run only first or only last would carry the drift.
    rounds = []
    for _ in range(repeats or (1 if cuda else 3)):
        bench_params(work, shape)
        rnd = [ours(work, "full", "full"), ours(work, "lora", "lora")]
        if cuda:  # compiled and eager must agree on the loss
            bench_params(work, shape, compile_=False)
            rnd.append(ours(work, "full", "full-eager"))
        rounds.append(rnd + [hf_trainer(work, shape)])
    rows = [sorted(column, key=lambda r: r["tokens_per_s"])[len(column) // 2] for column in zip(*rounds)]
    for row, column in zip(rows, zip(*rounds)):
        row["rounds_tokens_per_s"] = [r["tokens_per_s"] for r in column]
    hf = rows[-1]["tokens_per_s"]
    for r in rows:
        r["vs_hf_trainer"] = round(r["tokens_per_s"] / hf, 2)
    full, lora = rows[0], rows[1]
    results = {"model": shape["model"], "block": shape["block"], "training": rows, "rounds": len(rounds),
               "lora_over_full_tokens_per_s": round(lora["tokens_per_s"] / full["tokens_per_s"], 3),
               "lora_over_full_peak_mem": round(lora["peak_mem_gib"] / full["peak_mem_gib"], 3),
               "ours_over_hf_tokens_per_s": round(full["tokens_per_s"] / hf, 2)}
    if cuda:
        results["compiled_vs_eager_loss_rel_diff"] = abs(rows[2]["final_loss"] / full["final_loss"] - 1)
    return results


# The loss comparison: GPT-2 124M's real shapes (peak RSS on a CPU, peak allocation on a GPU) at
# batch 4 (at the params' 8, the model's own loss needs more than this 24 GiB machine: the OOM
# killer stopped it), as configured (dropout 0.1) and with dropout off: on a CPU, attention dropout
# sends PyTorch's scaled_dot_product_attention to its math path, which keeps each layer's attention
# probabilities, 1.7 GiB a sequence over 12 layers (more than the logits); with dropout off (or on a
# GPU) the attention kernel keeps none. And a tiny model with Qwen2.5's 151,936-token vocabulary,
# where the logits are nearly all of the memory. Three steps each (the first apart as warm-up).
LOSS_SHAPES = {
    "GPT-2 124M (random init), batch 4 x 1,024": {"model": "GPT-2 124M", "config": {}, "block": 1024, "batch": 4,
                                                  "tokens": 4 * 1024 * 3, "log_every": 1},
    "GPT-2 124M, dropout off, batch 4 x 1,024": {"model": "GPT-2 124M", "config": {}, "dropout": False,
                                                 "block": 1024, "batch": 4, "tokens": 4 * 1024 * 3, "log_every": 1},
    "2-layer, 151,936-token vocabulary, batch 8 x 128": {"model": "tiny, 152k vocabulary", "block": 128, "batch": 8,
                                                         "config": {"n_layer": 2, "n_head": 2, "n_embd": 64,
                                                                    "n_positions": 128, "vocab_size": 151_936},
                                                         "tokens": 8 * 128 * 3, "log_every": 1},
}


def bench_loss(work: Path) -> list[dict]:
    """train.loss: model vs chunked, side by side in one run (each in its own process), per shape."""
    rows = []
    for i, (label, shape) in enumerate(LOSS_SHAPES.items()):
        folder = work / f"loss-{i}"
        folder.mkdir(parents=True)
        setup(folder, shape)
        if not shape.get("dropout", True):
            no_dropout(folder / "pre")
        pair = []
        for kind in ("model", "chunked"):
            bench_params(folder, shape, loss=kind)
            pair.append(ours(folder, "full", f"full-{kind}") | {"shape": label, "loss": kind})
        for r in pair:
            r["vs_model_loss_mem"] = round(r["peak_mem_gib"] / pair[0]["peak_mem_gib"], 3)
            r["vs_model_loss_tokens_per_s"] = round(r["tokens_per_s"] / pair[0]["tokens_per_s"], 3)
        rows += pair
    return rows


# Gradient checkpointing at GPT-2 124M's real shapes, without dropout so both runs compute the same
# losses (checkpointing replays a layer's dropout masks, but the comparison should not rest on it).
CHECKPOINTING_SHAPE = {"config": {}, "block": 1024, "batch": 2, "tokens": 3 * 2 * 1024, "log_every": 1}


def bench_checkpointing(work: Path) -> list[dict]:
    """train.gradient_checkpointing off and on, for full and LoRA, side by side (each in its own
    process, peak memory its own)."""
    setup(work, CHECKPOINTING_SHAPE)
    no_dropout(work / "pre")
    rows = []
    for method in ("full", "lora"):
        pair = []
        for on in (False, True):
            bench_params(work, CHECKPOINTING_SHAPE, **{"train.gradient_checkpointing": on, "lora.dropout": 0.0})
            tag = f"{method}-{'ckpt' if on else 'plain'}"
            pair.append(ours(work, method, tag, label=f"ours, {method}, checkpointing {'on' if on else 'off'}"))
        for r in pair:
            r["vs_off_mem"] = round(r["peak_mem_gib"] / pair[0]["peak_mem_gib"], 3)
            r["vs_off_tokens_per_s"] = round(r["tokens_per_s"] / pair[0]["tokens_per_s"], 3)
            r["final_loss_delta"] = abs(r["final_loss"] - pair[0]["final_loss"])
        rows += pair
    return rows


LIVE_MARKS = (100, 1_000, 4_000)  # steps at which the live bench reads the time a step has cost


def bench_live(work: Path) -> list[dict]:
    """Milliseconds per logged step up to each LIVE_MARKS step, as a training stage logs (each
    step's loss, lr and tokens/s every train.log_every steps, the run's config as params):
    Accelerate's DVCLive tracker as it comes, then ftstudy.train.tracking.LiveTracker, in turn in this
    process."""
    from accelerate.tracking import DVCLiveTracker

    from ftstudy.config import load_params
    from ftstudy.train.tracking import LiveTracker
    from ftstudy.train.training import tracker_config

    p = load_params(ROOT / "params.yaml")
    config, every = tracker_config(p, "full"), p.train.log_every
    rows = []
    for label, make in (("Accelerate's DVCLiveTracker", lambda d: DVCLiveTracker(dir=str(d), dvcyaml=None,
                                                                                  save_dvc_exp=False)),
                        ("ftstudy LiveTracker", LiveTracker)):
        tracker = make(work / label.split()[-1])
        tracker.start()
        tracker.store_init_configuration(config)
        row, last, t0 = {"tracker": label}, 0, time.perf_counter()
        for step in range(1, LIVE_MARKS[-1] + 1):
            tracker.log({"train/loss": 1 / step} | ({"lr": 1e-4, "tokens_per_s": 1e5} if step % every == 0 else {}),
                        step=step)
            if step in LIVE_MARKS:
                now = time.perf_counter()
                row[f"ms_per_step_{last + 1}_{step}"] = round((now - t0) / (step - last) * 1e3, 2)
                last, t0 = step, now
        rows.append(row)
    return rows


def _table(rows, headers) -> str:
    from tabulate import tabulate

    return tabulate(rows, headers, tablefmt="github", disable_numparse=True)


def sections(results: dict) -> dict[str, str]:
    """Each measured table as markdown, with a line saying what it measured: block name -> text."""
    out = {}
    if "live" in results:
        out["bench-live"] = (f"A logged step's cost, ms (steps {', '.join(map(str, LIVE_MARKS))}; Studio not configured):\n\n"
                             + _table([list(r.values()) for r in results["live"]], list(results["live"][0])))
    if "loss" in results:
        out["bench-loss"] = ("Training loss: the model's own (whole logits) vs chunked, full fine-tuning, fp32, each "
                             "path in its own process:\n\n" + _table(
                                 [[r["shape"], r["loss"], f"{r['peak_mem_gib']:.2f}", f"{r['vs_model_loss_mem']:.2f}x",
                                   f"{r['tokens_per_s']:,.0f}", f"{r['vs_model_loss_tokens_per_s']:.2f}x",
                                   f"{r['final_loss']:.4f}"] for r in results["loss"]],
                                 ["shape", "train.loss", "peak mem GiB", "vs model", "tokens/s", "vs model", "final loss"]))
    if "checkpointing" in results:
        rows = results["checkpointing"]
        out["bench-checkpointing"] = (
            f"Gradient checkpointing at GPT-2 124M's real shapes (random init, batch 2 x 1,024, dropout off, 3 steps), "
            f"peak memory as {rows[0]['device']} reports it, each run in its own process:\n\n" + _table(
                [[r["path"], f"{r['peak_mem_gib']:.2f}", f"{r['vs_off_mem']:.2f}x", f"{r['tokens_per_s']:,.0f}",
                  f"{r['vs_off_tokens_per_s']:.2f}x", f"{r['final_loss']:.6f}"] for r in rows],
                ["path", "peak GiB", "vs off", "tokens/s", "vs off", "final loss"]))
    if "training" in results:
        out["bench-training"] = (
            f"Training: {results['model']}, {results['block']}-token blocks, on {results['device']}; median of "
            f"{results['rounds']} alternating round(s):\n\n" + _table(
                [[r["path"], f"{r['tokens']:,}", f"{r['tokens_per_s']:,.0f}", f"{r['warmup_s']}",
                  "–" if r["mfu"] is None else f"{r['mfu']:.1%}", f"{r['peak_mem_gib']}", r["precision"],
                  f"{r['vs_hf_trainer']:.2f}x"] for r in results["training"]],
                ["path", "tokens", "tokens/s (steady)", "warm-up s", "MFU", "peak mem GiB", "precision", "vs HF Trainer"])
            + f"\n\nLoRA / full: {results['lora_over_full_tokens_per_s']}x tokens/s, "
            f"{results['lora_over_full_peak_mem']}x peak memory.")
    if "prepare" in results:
        rows = results["prepare"]
        what = "WikiText-format lines" if rows[0]["format"] == "text" else "one JSON Lines file, text in `content`"
        out[f"bench-prepare-{rows[0]['format']}"] = (
            f"Prepare: {rows[0]['mb']} MB synthetic corpus ({what}), GPT-2's tokenizer, each path in its own process:"
            "\n\n" + _table([[r["path"], f"{r['seconds']}", f"{r['mb_per_s']}", f"{r['tokens']:,}", f"{r['tokens_per_s']:,}",
                               f"{r['peak_rss_gib']}"] for r in rows],
                              ["path", "seconds", "MB/s", "tokens", "tokens/s", "peak RSS GiB"])
            + f"\n\nOurs is {results['prepare_speedup_vs_run_clm']}x run_clm's speed.")
    return out


def write_docs(results: dict, command: str) -> None:
    """Each table into its block of docs/performance.md, stamped with the machine, date and command."""
    from scripts.docs_tables import stamp, write_block

    for name, text in sections(results).items():
        print(f"bench: wrote {write_block('performance.md', name, stamp(command) + chr(10) + chr(10) + text)} ({name})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="bench-results.json")
    ap.add_argument("--no-docs", action="store_true", help="print and write JSON, but leave docs/performance.md alone")
    ap.add_argument("--prepare-mb", type=int, default=540)
    ap.add_argument("--prepare-format", choices=("text", "jsonl"), default="text",
                    help="the prepare corpus: WikiText-format lines, or one JSON Lines export (text in `content`)")
    ap.add_argument("--skip-prepare", action="store_true")
    ap.add_argument("--skip-training", action="store_true")
    ap.add_argument("--loss", action="store_true", help="only the loss comparison (train.loss: model vs chunked)")
    ap.add_argument("--live", action="store_true", help="only a logged step's cost (DVCLive trackers)")
    ap.add_argument("--checkpointing", action="store_true",
                    help="only gradient checkpointing off vs on at GPT-2 124M's real shapes, full and LoRA")
    ap.add_argument("--repeats", type=int, default=0, help="rounds of the training paths (default: 3 on CPU, 1 on GPU)")
    ap.add_argument("--_hf-trainer", nargs=3, help=argparse.SUPPRESS)
    ap.add_argument("--_prepare", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._hf_trainer:
        return _hf_trainer_child(Path(args._hf_trainer[0]), json.loads(args._hf_trainer[1]), Path(args._hf_trainer[2]))
    if args._prepare:
        which, path, work, out = args._prepare
        return _prepare_child(which, Path(path), Path(work), Path(out))

    import torch

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    cuda = torch.cuda.is_available()
    results: dict = {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__}
    with tempfile.TemporaryDirectory() as tmp:
        if args.checkpointing:
            results["checkpointing"] = bench_checkpointing(Path(tmp))
        elif args.live:
            results["live"] = bench_live(Path(tmp))
        elif args.loss:
            results["loss"] = bench_loss(Path(tmp))
        elif not args.skip_training:
            results |= bench_training(Path(tmp) / "train", cuda, args.repeats)
        if not args.skip_prepare and not (args.loss or args.live or args.checkpointing):
            prep = bench_prepare(args.prepare_mb, args.prepare_format, Path(tmp))
            results["prepare"] = prep
            results["prepare_speedup_vs_run_clm"] = round(prep[1]["seconds"] / prep[0]["seconds"], 2)
    for text in sections(results).values():
        print("\n" + text)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nbench: wrote {args.out}")
    if not args.no_docs:
        write_docs(results, " ".join(["python -m scripts.bench", *(a for a in sys.argv[1:] if a != "--no-docs")]))


if __name__ == "__main__":
    main()
