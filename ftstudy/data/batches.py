"""What the training loop reads: a split as units (token blocks of running text, or instruction
examples) that turn into device batches, with the number of target tokens each set of units
counts in the loss, so that a step's loss is the mean over its targets whatever the micro-batch,
gradient accumulation or process split.

- TextBlocks: non-overlapping blocks of data.block_size tokens; every next token is a target.
- ExampleBatches: instruction examples padded on the right to the longest of the micro-batch,
  with an attention mask; targets are the answer tokens (every token with data.train_on_prompt),
  never padding. Padding keeps each example to itself in any model family and attention kernel;
  its cost is the padded share of the batch's positions, counted in `padding`.
"""

from __future__ import annotations

import numpy as np

from ftstudy.data import examples, token_files


class TextBlocks:
    def __init__(self, tokens: np.ndarray, block_size: int):
        self.blocks = token_files.blocks(tokens, block_size)

    def __len__(self) -> int:
        return len(self.blocks)

    def batch(self, idx: np.ndarray) -> dict[str, np.ndarray]:
        return {"input_ids": self.blocks[np.sort(idx)].astype(np.int64)}

    def counts(self, idx: np.ndarray) -> tuple[int, int]:
        """(target tokens, input tokens) of these units."""
        n = len(idx) * self.blocks.shape[1]
        return n - len(idx), n


PAD_ID = 0  # what fills a padded position: any id does, since no token attends to it and it is no target


class ExampleBatches:
    def __init__(self, ex: examples.Examples, train_on_prompt: bool):
        self.ex, self.train_on_prompt = ex, train_on_prompt
        self.lengths = np.diff(ex.offsets)
        self.padded = self.real = 0  # positions of the batches built so far: padding, and tokens

    def __len__(self) -> int:
        return len(self.ex)

    def _targets(self, i: int) -> np.ndarray:
        """Which next tokens of example i count: its answer tokens, or all (data.train_on_prompt)."""
        _, mask = self.ex.example(i)
        return np.ones(len(mask) - 1, dtype=bool) if self.train_on_prompt else mask[1:].astype(bool)

    def batch(self, idx: np.ndarray) -> dict[str, np.ndarray]:
        idx = np.sort(idx)
        width = int(self.lengths[idx].max())
        ids = np.full((len(idx), width), PAD_ID, dtype=np.int64)
        attention = np.zeros((len(idx), width), dtype=np.int64)
        targets = np.zeros((len(idx), width - 1), dtype=bool)
        for row, i in enumerate(idx):
            tokens, _ = self.ex.example(int(i))
            ids[row, :len(tokens)] = tokens
            attention[row, :len(tokens)] = 1
            targets[row, :len(tokens) - 1] = self._targets(int(i))
        self.real += int(attention.sum())
        self.padded += attention.size - int(attention.sum())
        return {"input_ids": ids, "attention_mask": attention, "target_mask": targets}

    def counts(self, idx: np.ndarray) -> tuple[int, int]:
        targets = sum(int(self._targets(int(i)).sum()) for i in idx)
        return targets, int(self.lengths[idx].sum())

    @property
    def padding(self) -> float:
        """The share of batch positions that were padding, so far."""
        total = self.padded + self.real
        return self.padded / total if total else 0.0


def mean_tokens(units) -> float:
    """Input tokens a unit holds on average: a block's size, or the examples' mean length."""
    lengths = getattr(units, "lengths", None)
    return float(lengths.mean()) if lengths is not None and len(lengths) else float(units.blocks.shape[1])


def for_split(data_dir, split: str, meta: dict, block_size: int, train_on_prompt: bool):
    """The split's units for the loop: blocks of running text, or instruction examples."""
    if not token_files.is_instruct(meta):
        return TextBlocks(token_files.load_tokens(data_dir, split, meta), block_size)
    return ExampleBatches(examples.load(data_dir, split, meta), train_on_prompt)
