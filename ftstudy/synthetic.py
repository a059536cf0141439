"""Stand-ins built offline for what the Hub would serve: random-init models of real shapes and
WikiText-format corpora of a chosen size, with params pointed at them. Used by make bench,
scripts/gpu_check.py and the tests (the compute of random weights is the compute of real ones).

No stage imports this module.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import yaml

from ftstudy.config import PARAMS_FILE, flatten, set_keys

ROOT = Path(__file__).resolve().parent.parent
ASSETS = ROOT / "assets"
TOKENIZER = ASSETS / "gpt2-tokenizer"
SPLIT_FILES = {"train": "wiki.train.raw", "validation": "wiki.valid.raw", "test": "wiki.test.raw"}


def write_gpt2_124m(out: Path, seed: int = 0, **config) -> Path:
    """A save_pretrained folder: GPT2Config() (124M, 1,024 context, 50,257 vocabulary; `config`
    overrides, e.g. n_layer=2 for a dry run) at seeded random init, beside the real tokenizer."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    GPT2LMHeadModel(GPT2Config(**config)).save_pretrained(out)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TOKENIZER / f, out / f)
    return out


def write_corpus(out: Path, split_bytes: dict[str, int]) -> Path:
    """wiki.{train,valid,test}.raw of about split_bytes[split] bytes each: the tiny WikiText-format
    corpus repeated, cut at a line end."""
    out.mkdir(parents=True, exist_ok=True)
    for split, n in split_bytes.items():
        piece = (ASSETS / "tiny-wikitext" / SPLIT_FILES[split]).read_bytes()
        text = piece * (n // len(piece) + 1)
        cut = text.rfind(b"\n", 0, n) + 1 or n
        (out / SPLIT_FILES[split]).write_bytes(text[:cut])
    return out


def local_params(model: Path, corpus: Path, base: str | Path = ROOT / PARAMS_FILE, **overrides) -> dict:
    """The params at `base` pointed at a local model and corpus folder, without general sets or
    checkpoints, with dotted `overrides` applied (as `dvc exp run -S`)."""
    params = yaml.safe_load(Path(base).read_text(encoding="utf-8"))
    settings = {"model.name": str(model), "model.revision": None, "data.name": str(corpus), "data.revision": None,
                "data.config": None, "data.general": [], "train.checkpoint_every": 0}
    return set_keys(params, settings | overrides)


def no_dropout(model_dir: Path) -> None:
    """Switch off every dropout in a model folder's config (GPT-2's *_pdrop, other families'
    *_dropout), so that two runs differ only by the numerics under test (compiled code draws its
    dropout masks from another RNG stream than eager code)."""
    path = Path(model_dir) / "config.json"
    config = json.loads(path.read_text())
    config |= {k: 0.0 for k, v in config.items() if k.endswith(("pdrop", "dropout")) and isinstance(v, float)}
    path.write_text(json.dumps(config))


def write_params(folder: Path, params: dict) -> Path:
    (Path(folder) / PARAMS_FILE).write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
    return Path(folder) / PARAMS_FILE


def demo_overrides() -> dict:
    """assets/demo-params.yaml as dotted overrides."""
    return flatten(yaml.safe_load((ASSETS / "demo-params.yaml").read_text(encoding="utf-8")))


# The families every stage is tested on, each as its transformers config class, the sizes of a
# tiny random model (2 layers, width 64, 4 heads; 2 key-value heads where the family has GQA) and
# whether its output projection is tied to the input embedding, as in the family's real models:
# GPT-2, Llama 3.2 1B and Qwen2.5 0.5B tie it; Pythia (GPT-NeoX) does not; Phi-2 neither, and its
# head has a bias.
FAMILIES = {
    "gpt2": ("GPT2Config", {"n_layer": 2, "n_embd": 64, "n_head": 4, "n_positions": 128}, True),
    "gpt_neox": ("GPTNeoXConfig", {"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
                                   "intermediate_size": 128, "max_position_embeddings": 128}, False),
    "llama": ("LlamaConfig", {"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
                              "num_key_value_heads": 2, "intermediate_size": 128, "max_position_embeddings": 128}, True),
    "qwen2": ("Qwen2Config", {"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
                              "num_key_value_heads": 2, "intermediate_size": 128, "max_position_embeddings": 128}, True),
    "phi": ("PhiConfig", {"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
                          "intermediate_size": 128, "max_position_embeddings": 128}, False),
}
# Llama's tokenizers put a BOS token before each text, the others do not; the tiny Llama's does too.
LLAMA_BOS = "<|begin_of_text|>"
# And the tiny Llama chats as Llama 3 does: its header and end-of-turn tokens, and its template's shape.
LLAMA_CHAT_TOKENS = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
LLAMA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")


def tiny_tokenizer(family: str):
    """The bundled tiny BPE (assets/tiny-gpt2); for Llama with its own BOS token, added before each
    text as Llama 3's tokenizer does (a template post-processor), and Llama 3's chat tokens and
    template shape (data.format: messages)."""
    from tokenizers import Tokenizer
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer.from_file(str(ASSETS / "tiny-gpt2" / "tokenizer.json"))
    special = {"eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>"}
    if family == "llama":
        backend.add_special_tokens([LLAMA_BOS])
        bos = backend.token_to_id(LLAMA_BOS)
        backend.post_processor = TemplateProcessing(single=f"{LLAMA_BOS} $A", pair=f"{LLAMA_BOS} $A $B",
                                                    special_tokens=[(LLAMA_BOS, bos)])
        special["bos_token"] = LLAMA_BOS
        backend.add_special_tokens(LLAMA_CHAT_TOKENS)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, **special)
    if family == "llama":
        tokenizer.chat_template = LLAMA_CHAT_TEMPLATE
    return tokenizer


def write_tiny_model(family: str, out: Path, seed: int = 0, tie: bool | None = None) -> Path:
    """A save_pretrained folder of a tiny random model of `family` (a FAMILIES key), deterministic
    for a seed, beside its tiny tokenizer: about 0.2M parameters, 128-token context; the head tied
    as the family's real models have it, unless `tie` says otherwise."""
    import torch
    import transformers

    config_class, sizes, tied = FAMILIES[family]
    tokenizer = tiny_tokenizer(family)
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    config = getattr(transformers, config_class)(vocab_size=len(tokenizer), tie_word_embeddings=tied if tie is None else tie,
                                                 **ids, **sizes)
    torch.manual_seed(seed)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return Path(out)
