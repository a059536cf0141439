"""Instruction and chat data: records -> examples of tokens with an answer mask, their token files,
and batches of them.

data.format chooses how a record becomes an example:
- prompt_completion: the prompt's tokens, then the completion's and the tokenizer's EOS (so the
  model learns to stop), BOS first where the tokenizer adds one; the completion and EOS are the
  answer;
- messages: a list of {role, content} (system, user, assistant) rendered with the tokenizer's own
  chat template; each assistant turn, as the template renders it (its end-of-turn token
  included), is answer. A tokenizer without a chat template is refused before any work.
An example longer than data.block_size is cut to its first block_size tokens, counted; one left
with no answer token is dropped, counted; one whose last answer the cut shortens (drops text of,
not only its EOS or end of turn) is listed: as a held-out reference it is no longer the answer.

Token files per split: <split>.bin (the tokens of every example in order), <split>.mask.bin (one
byte per token: 1 for an answer token), <split>.offsets.npy (where each example starts, and the
end) and <split>.cut.npy (the examples whose last answer the cut shortened). Training batches
pad the examples of a micro-batch to the longest of them (attention mask, no loss on padding)
rather than packing them into blocks: with padding no example can attend to another in any model
family or attention kernel, and the cost is the padding itself, reported as the share of padded
positions (ftstudy.data.batches).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ftstudy.config import ConfigError
from ftstudy.data.token_files import DataError

ROLES = ("system", "user", "assistant")


def fields(d) -> tuple[tuple[str, str], ...]:
    """The record fields a format reads, each with the params key naming it."""
    if d.format == "prompt_completion":
        return ((d.prompt_column, "data.prompt_column"), (d.completion_column, "data.completion_column"))
    return ((d.messages_column, "data.messages_column"),)


def no_chat_template(model_name: str) -> str:
    return (f"data.format: messages renders each conversation with the tokenizer's chat template, and "
            f"{model_name}'s tokenizer has none; use data.format: prompt_completion, or a model whose "
            "tokenizer has a chat template (assets/tiny-chat is one: docs/data.md)")


def has_chat_template(folder: Path) -> bool:
    """Whether a save_pretrained folder's tokenizer has a chat template, read from its files alone."""
    folder = Path(folder)
    if (folder / "chat_template.jinja").is_file() or (folder / "chat_template.json").is_file():
        return True
    try:
        return bool(json.loads((folder / "tokenizer_config.json").read_text()).get("chat_template"))
    except (OSError, ValueError):
        return False


def check_tokenizer(d, tokenizer, model_name: str) -> None:
    """Refuse, before any work, a messages format for a tokenizer without a chat template."""
    if d.format == "messages" and not getattr(tokenizer, "chat_template", None):
        raise ConfigError(no_chat_template(model_name))


def canonical(record) -> str:
    """A record as one string, for the split's keyed hash and for duplicate detection."""
    return json.dumps(record, sort_keys=True, ensure_ascii=False)


def _messages(value, where: str, key: str) -> list[dict]:
    if isinstance(value, str):  # a CSV cell or a string column holding JSON
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise DataError(f"{where}: {key} is text that is not a JSON list of messages") from None
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: {key} must be a non-empty list of {{role, content}} messages")
    for m in value:
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise DataError(f"{where}: {key}: every message needs a role and a content, got {str(m)[:80]!r}")
        if m["role"] not in ROLES:
            raise DataError(f"{where}: {key}: unknown role {m['role']!r}; roles are {', '.join(ROLES)}")
        if not isinstance(m["content"], str):
            raise DataError(f"{where}: {key}: a message's content must be text, got {type(m['content']).__name__}")
    if not any(m["role"] == "assistant" and m["content"].strip() for m in value):
        raise DataError(f"{where}: {key}: no assistant message with content: nothing to learn or score")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _template(tokenizer, messages, **kw) -> list[int]:
    return list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False, **kw))


def render(d, tokenizer, record, where: str, bos: int | None) -> tuple[list[int], list[int]]:
    """(token ids, answer mask) of one record under data.format."""
    if d.format == "prompt_completion":
        prompt, completion = record
        for value, key in ((prompt, "data.prompt_column"), (completion, "data.completion_column")):
            if not isinstance(value, str):
                raise DataError(f"{where}: {key} holds {type(value).__name__}, not text")
        if not completion.strip():
            raise DataError(f"{where}: the completion (data.completion_column) is empty: nothing to learn or score")
        head = ([bos] if bos is not None else []) + tokenizer(prompt, add_special_tokens=False)["input_ids"]
        answer = tokenizer(completion, add_special_tokens=False)["input_ids"]
        if tokenizer.eos_token_id is not None:
            answer.append(tokenizer.eos_token_id)
        return head + answer, [0] * len(head) + [1] * len(answer)
    messages = _messages(record, where, "data.messages_column")
    ids = _template(tokenizer, messages)
    mask = [0] * len(ids)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = _template(tokenizer, messages[:i], add_generation_prompt=True) if i else []
        through = _template(tokenizer, messages[:i + 1])
        if through[:len(before)] != before or ids[:len(through)] != through:
            raise DataError(f"{where}: the chat template renders turn {i + 1} differently as the conversation grows, so "
                            "its answer tokens cannot be told apart; use data.format: prompt_completion")
        mask[len(before):len(through)] = [1] * (len(through) - len(before))
    return ids, mask


class ExampleWriter:
    """One split's examples being written: tokens, answer mask and offsets, with counts and a hash
    of the examples in order."""

    def __init__(self, folder: Path, split: str, dtype: np.dtype, block_size: int, tokenizer):
        import hashlib

        self.folder, self.split, self.dtype, self.block_size = Path(folder), split, dtype, block_size
        self.tokenizer = tokenizer
        self.answer_bytes = 0
        self.tokens_file = open(self.folder / f"{split}.bin", "wb")
        self.mask_file = open(self.folder / f"{split}.mask.bin", "wb")
        self.offsets = [0]
        self.cut: list[int] = []  # examples whose last answer the block_size cut shortened
        self.answer_tokens = self.truncated = self.dropped = self.duplicates = self.bytes = 0
        self.digest = hashlib.sha256()

    def write(self, ids: list[int], mask: list[int], digest: bytes, size: int) -> None:
        answer_cut = False
        if len(ids) > self.block_size:
            # An answer running across the cut is the example's last; it counts as cut when what the
            # cut drops of it spells text (not only its EOS or end of turn).
            end = self.block_size
            while end < len(mask) and mask[end]:
                end += 1
            answer_cut = bool(mask[self.block_size - 1]) and bool(
                self.tokenizer.decode(ids[self.block_size:end], skip_special_tokens=True).strip())
            ids, mask = ids[:self.block_size], mask[:self.block_size]
            self.truncated += 1
        mask[0] = 0  # the first token is never a target: nothing comes before it
        if not any(mask):
            self.dropped += 1
            return
        if answer_cut:
            self.cut.append(len(self.offsets) - 1)
        np.asarray(ids, dtype=self.dtype).tofile(self.tokens_file)
        np.asarray(mask, dtype=np.uint8).tofile(self.mask_file)
        self.offsets.append(self.offsets[-1] + len(ids))
        self.answer_tokens += sum(mask)
        self.answer_bytes += self._spelled(ids, mask)
        self.bytes += size
        self.digest.update(digest)

    def _spelled(self, ids: list[int], mask: list[int]) -> int:
        """The UTF-8 bytes the answer tokens spell, each run of them decoded (special tokens, such as
        EOS or a template's end of turn, spell none): bits per byte divides the answers' NLL by these."""
        total, start = 0, None
        for i, m in enumerate([*mask, 0]):
            if m and start is None:
                start = i
            elif not m and start is not None:
                total += len(self.tokenizer.decode(ids[start:i], skip_special_tokens=True).encode("utf-8"))
                start = None
        return total

    def close(self) -> dict:
        for f in (self.tokens_file, self.mask_file):
            f.flush()
            f.close()
        np.save(self.folder / f"{self.split}.offsets.npy", np.asarray(self.offsets, dtype=np.int64))
        np.save(self.folder / f"{self.split}.cut.npy", np.asarray(self.cut, dtype=np.int64))
        return {"tokens": self.offsets[-1], "bytes": self.bytes, "documents": len(self.offsets) - 1,
                "answer_tokens": self.answer_tokens, "answer_bytes": self.answer_bytes, "truncated": self.truncated,
                "dropped_no_answer": self.dropped, "answers_cut": len(self.cut),
                "duplicates_removed": self.duplicates, "documents_sha256": self.digest.hexdigest()}


@dataclass(frozen=True)
class Examples:
    """A prepared split of instruction examples: tokens, answer mask, example offsets, and the
    examples whose last answer data.block_size cut (`cut`, in order)."""
    tokens: np.ndarray
    mask: np.ndarray
    offsets: np.ndarray
    cut: np.ndarray

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def example(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        return self.tokens[self.offsets[i]:self.offsets[i + 1]], self.mask[self.offsets[i]:self.offsets[i + 1]]

    def last_answer(self, i: int) -> tuple[int, int]:
        """(start, end) within example i of its last run of answer tokens (the reply a held-out
        prompt asks for)."""
        _, mask = self.example(i)
        end = int(np.flatnonzero(mask)[-1]) + 1
        start = end
        while start > 0 and mask[start - 1]:
            start -= 1
        return start, end


def load(data_dir: str | Path, split: str, meta: dict) -> Examples:
    from ftstudy.data.token_files import load_tokens

    tokens = load_tokens(data_dir, split, meta)
    mask = np.memmap(Path(data_dir) / f"{split}.mask.bin", dtype=np.uint8, mode="r")
    offsets = np.load(Path(data_dir) / f"{split}.offsets.npy")
    if len(mask) != len(tokens) or offsets[-1] != len(tokens):
        raise DataError(f"{data_dir}: {split}'s mask or offsets do not match its {len(tokens)} tokens; rerun "
                        "`dvc repro -f prepare`")
    cut = Path(data_dir) / f"{split}.cut.npy"
    if not cut.is_file():  # prepared before the cut answers were listed
        raise DataError(f"{cut}: not found; rerun `dvc repro -f prepare`")
    return Examples(tokens, mask, offsets, np.load(cut))
