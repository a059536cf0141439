"""Stage compare: the three models' per-token test NLL -> paired perplexity ratios (a DVC metric).

For each pair (full vs pretrained, lora vs pretrained, full vs lora): the ratio of their test
perplexities with a 95% paired chunk-bootstrap interval. The models are scored on the very same
tokens, so the same resampled chunks are drawn for both (gpt2study.scoring.paired_ppl_ratio): a
tighter and more honest test than whether two separate intervals overlap. The report's findings
call a winner only when the paired interval excludes 1.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from gpt2study.config import load_params
from gpt2study.errors import run_stage
from gpt2study.outputs import write_json
from gpt2study.scoring import paired_ppl_ratio

PAIRS = (("full", "pretrained"), ("lora", "pretrained"), ("full", "lora"))


def main() -> None:
    ap = argparse.ArgumentParser(description="Paired model comparisons; run by dvc.yaml stage compare")
    ap.add_argument("--nll", required=True, type=Path, help="folder of <model>.npy per-token test NLL")
    ap.add_argument("--out", required=True, help="metrics JSON to write")
    args = ap.parse_args()
    p = load_params()
    nll = {m: np.load(args.nll / f"{m}.npy") for m in {m for pair in PAIRS for m in pair}}
    ev = p.evaluate
    paired = {f"{a}_vs_{b}": paired_ppl_ratio(nll[a], nll[b], ev.bootstrap_chunk, ev.bootstrap_samples, p.seed)
              for a, b in PAIRS}
    write_json(args.out, {"paired": paired})
    print("compare: test perplexity ratios " + ", ".join(
        f"{k} {v['ratio']:.3f} [{v['lo']:.3f}, {v['hi']:.3f}]" for k, v in paired.items()) + f"; wrote {args.out}")


if __name__ == "__main__":
    run_stage(main)
