"""Build the bundled tiny assets, deterministically: python assets/build_assets.py [derived]

Writes, next to this file:
  tiny-general/{train,test}.txt    a small general-domain corpus (everyday prose); the tiny
                                   GPT-2 is pretrained on train.txt, test.txt is held out
  tiny-wikitext/wiki.{train,valid,test}.raw
                                   a WikiText-format corpus of another domain (encyclopedia
                                   articles on invented rivers, towns and ships)
  tiny-gpt2/                       a GPT-2 (same model class, 2 layers, 1,024-token byte-level
                                   BPE vocabulary trained here) genuinely pretrained on
                                   tiny-general/train.txt
  ../tasks/                        two lm-evaluation-harness tasks as local YAML with their data
                                   (the demo's `tasks:`): tiny_cloze, a multiple-choice cloze on
                                   unseen general-domain sentences (what fine-tuning may make the
                                   model forget), and tiny_complete, sentence openings of the
                                   encyclopedia domain with their reference endings, answered by
                                   greedy generation and scored by exact match (what it learns)
  tiny-chat/                       the tiny GPT-2 with a chat template (role, newline, content,
                                   <|endoftext|> closing each turn), for chat data on a bundled model
  tiny-jsonl/articles.jsonl        the same articles as one JSON Lines export, a record per
                                   article ({"id", "title", "content"}): one file, no splits,
                                   the text in a field not called "text"
  tiny-instruct/prompt_completion.jsonl
  tiny-instruct/messages.jsonl     instruction data from the same articles: a request for one
                                   section of an article, answered with that section's first
                                   two sentences; as {"prompt", "completion"} records, and as
                                   conversations ({"messages": [system, user, assistant, ...]}),
                                   a two-section conversation in every third

`derived` rebuilds only the files derived from the others (tiny-jsonl, tiny-instruct, tiny-chat, tasks), in seconds.

Nothing is downloaded. The text comes from seeded grammars below, so the demo tells the real
study's story: fine-tuning on the WikiText-domain corpus lowers its perplexity below the
pretrained model's, while the general-domain text measures forgetting.
"""

from __future__ import annotations

import random
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SEED = 1234
VOCAB_SIZE = 1024
CONTEXT = 128

# ---------------------------------------------------------------- general-domain prose
NAMES = ["Anna", "Ben", "Clara", "David", "Emma", "Frank", "Grace", "Henry", "Iris", "Jack",
         "Lucy", "Mark", "Nora", "Oscar", "Paula", "Ruth", "Sam", "Tom", "Vera", "Will"]
JOBS = ["baker", "teacher", "doctor", "farmer", "driver", "nurse", "painter", "cook",
        "gardener", "student", "writer", "builder"]
PLACES = ["the market", "the park", "the station", "the library", "the kitchen", "the garden",
          "the school", "the shop", "the beach", "the office", "the bakery", "the hospital"]
THINGS = ["apples", "bread", "a book", "some milk", "a bicycle", "the tickets", "a letter",
          "fresh flowers", "a warm coat", "the keys", "a cup of tea", "new shoes", "a map"]
TIMES = ["in the morning", "after lunch", "on Monday", "at night", "on the weekend",
         "before dinner", "every day", "last week", "yesterday", "early today"]
FEELINGS = ["happy", "tired", "hungry", "calm", "busy", "excited", "worried", "cold"]
VERBS_GO = ["walked to", "drove to", "went to", "ran to", "came back from", "stopped at"]
VERBS_GET = ["bought", "found", "forgot", "carried", "picked up", "brought home", "lost"]
WEATHER = ["sunny", "rainy", "windy", "cloudy", "warm", "cold", "quiet"]


def general_sentence(r: random.Random) -> str:
    a, b = r.sample(NAMES, 2)
    kind = r.randrange(8)
    if kind == 0:
        return f"{a} {r.choice(VERBS_GO)} {r.choice(PLACES)} {r.choice(TIMES)}."
    if kind == 1:
        return f"{a} {r.choice(VERBS_GET)} {r.choice(THINGS)} at {r.choice(PLACES)}."
    if kind == 2:
        return f"{a} is a {r.choice(JOBS)}, and {b} is a {r.choice(JOBS)}."
    if kind == 3:
        return f"{a} felt {r.choice(FEELINGS)} because {b} {r.choice(VERBS_GET)} {r.choice(THINGS)}."
    if kind == 4:
        return f"It was {r.choice(WEATHER)} {r.choice(TIMES)}, so {a} stayed at {r.choice(PLACES)}."
    if kind == 5:
        return f'"Can you bring {r.choice(THINGS)}?" {a} asked. "Yes," said {b}.'
    if kind == 6:
        return f"{a} and {b} met at {r.choice(PLACES)} and talked about {r.choice(THINGS)}."
    return f"The {r.choice(JOBS)} told {a} to go to {r.choice(PLACES)} {r.choice(TIMES)}."


def fact_sentence(r: random.Random) -> str:
    """General knowledge in plain prose: the words of the encyclopedia domain, not its format."""
    name, other, year = proper(r), proper(r), r.randint(1100, 1899)
    return r.choice([
        f"The town of {name} is in {r.choice(REGIONS)}, not far from {other}.",
        f"The river {name} is {r.randint(20, 900)} km long.",
        f"In {year}, the ship {name} sailed from {other} to {r.choice(REGIONS)}.",
        f"{name} was a fortress built in the {r.choice(CENTURIES)} century.",
        f"About {r.randint(1, 9)},{r.randint(0, 999):03d} people lived in {name} in {year}.",
        f"My friend {r.choice(NAMES)} visited {name} and liked the old market.",
    ])


def spaced(sentence: str) -> str:
    """Some web text spaces its punctuation, as WikiText does."""
    for mark in ",.?":
        sentence = sentence.replace(mark, f" {mark}")
    return sentence


def general_corpus(r: random.Random, paragraphs: int) -> str:
    out = []
    for _ in range(paragraphs):
        sentences = [fact_sentence(r) if r.random() < 0.3 else general_sentence(r)
                     for _ in range(r.randint(3, 7))]
        out.append(" ".join(spaced(s) if r.random() < 0.2 else s for s in sentences))
    return "\n\n".join(out) + "\n"


# ---------------------------------------------------------------- WikiText-format articles
SYLLABLES = ["mar", "ven", "tor", "al", "dun", "ese", "bri", "hal", "ost", "kel", "ra", "vin",
             "sul", "ard", "en", "lo", "thar", "mi", "cor", "wen"]
KINDS = ["river", "town", "ship", "fortress"]
REGIONS = ["the province of Tessaly", "northern Orland", "the Vell Valley", "the Arden coast",
           "the eastern marches", "the Isle of Cray"]
CENTURIES = ["12th", "14th", "16th", "17th", "18th", "19th"]
SECTIONS = {
    "river": ["Course", "History", "Ecology"],
    "town": ["History", "Geography", "Economy"],
    "ship": ["Design", "Service history", "Fate"],
    "fortress": ["Construction", "Sieges", "Legacy"],
}


def proper(r: random.Random) -> str:
    return "".join(r.sample(SYLLABLES, r.randint(2, 3))).capitalize()


def number(r: random.Random) -> str:
    n = r.randint(12, 9800)
    return f"{n // 1000} @,@ {n % 1000:03d}" if n >= 1000 else str(n)


def decimal(r: random.Random) -> str:
    return f"{r.randint(1, 99)} @.@ {r.randint(0, 9)}"


def wiki_sentence(r: random.Random, kind: str, name: str) -> str:
    other = proper(r)
    year = r.randint(1100, 1899)
    choices = [
        f"The {kind} was first recorded in {year} by the surveyor {other} .",
        f"In the {r.choice(CENTURIES)} century , {name} became a centre of trade for {r.choice(REGIONS)} .",
        f"It lies {decimal(r)} km north @-@ east of {other} , near {r.choice(REGIONS)} .",
        f"By {year} the population of the area had reached {number(r)} .",
        f"{name} was rebuilt in {year} after a fire destroyed the {r.choice(['old', 'western', 'upper', 'main'])} quarter .",
        f"The name {name} is derived from the old word for \" {other.lower()} \" .",
        f"Historians such as {other} have described the {kind} as one of the most important in {r.choice(REGIONS)} .",
        f"In {year} , a treaty between {other} and {proper(r)} placed {name} under a new crown .",
    ]
    if kind == "river":
        choices += [f"The river is {number(r)} km long and drains a basin of {number(r)} square kilometres .",
                    f"Its main tributary , the {other} , joins it at {proper(r)} ."]
    if kind == "ship":
        choices += [f"She displaced {number(r)} tonnes and carried a crew of {r.randint(40, 900)} .",
                    f"The ship was launched at the {other} yard in {year} and served for {r.randint(3, 40)} years ."]
    if kind == "fortress":
        choices += [f"The walls were {decimal(r)} metres thick and enclosed {number(r)} square metres .",
                    f"During the siege of {year} , the garrison of {r.randint(80, 3000)} men held out for {r.randint(2, 30)} weeks ."]
    if kind == "town":
        choices += [f"The town holds a market every {r.choice(['Monday', 'Friday', 'spring', 'autumn'])} .",
                    f"As of the census of {year} , it had {number(r)} inhabitants ."]
    return r.choice(choices)


def wiki_paragraph(r: random.Random, kind: str, name: str) -> str:
    return " " + " ".join(wiki_sentence(r, kind, name) for _ in range(r.randint(3, 6))) + " \n"


def wiki_article(r: random.Random) -> list[str]:
    kind, name = r.choice(KINDS), proper(r)
    lines = [" \n", f" = {name} = \n", " \n", wiki_paragraph(r, kind, name), " \n"]
    for section in SECTIONS[kind]:
        lines += [f" = = {section} = = \n", " \n", wiki_paragraph(r, kind, name), " \n"]
    return lines


def wiki_corpus(r: random.Random, articles: int) -> str:
    return "".join(line for _ in range(articles) for line in wiki_article(r))


def articles_jsonl(wiki: Path) -> str:
    """Every article of the WikiText-format files as a JSON Lines record, in file order."""
    import json
    import re

    records, current = [], None
    for split in ("train", "valid", "test"):
        for line in (wiki / f"wiki.{split}.raw").read_text(encoding="utf-8").splitlines(keepends=True):
            if (title := re.fullmatch(r" = ([^=].*) = \n", line)) is not None:
                current = {"id": len(records), "title": title.group(1), "lines": []}
                records.append(current)
            if current is not None and line.strip():
                current["lines"].append(line.strip())
    return "".join(json.dumps({"id": r["id"], "title": r["title"], "content": "\n\n".join(r["lines"])}) + "\n"
                   for r in records)


def sections(wiki: Path) -> list[tuple[str, str, str]]:
    """(article title, section name, the section's first two sentences) for every section of every
    article, the opening paragraph as section "opening"."""
    import re

    out, title, section = [], None, None
    for split in ("train", "valid", "test"):
        for line in (wiki / f"wiki.{split}.raw").read_text(encoding="utf-8").splitlines():
            if (m := re.fullmatch(r" = ([^=].*) = ", line)) is not None:
                title, section = m.group(1), "opening"
            elif (m := re.fullmatch(r" = = (.*) = = ", line)) is not None:
                section = m.group(1).lower()
            elif line.strip() and title is not None:
                sentences = re.split(r"(?<= \.) ", line.strip())
                out.append((title, section, " ".join(sentences[:2])))
    return out


def instructions(wiki: Path) -> tuple[str, str]:
    """The tiny instruction set as JSON Lines: (prompt_completion, messages)."""
    import json

    items = sections(wiki)
    ask = lambda title, section: f"Write the {section} of the article on {title}."  # noqa: E731
    pc = "".join(json.dumps({"prompt": f"Request: {ask(t, s)}\nAnswer:", "completion": " " + text}) + "\n"
                 for t, s, text in items)
    system = {"role": "system", "content": "You write short encyclopedia paragraphs."}
    conversations, i = [], 0
    while i < len(items):
        turns = 2 if len(conversations) % 3 == 2 and i + 1 < len(items) else 1
        messages = [system]
        for t, s, text in items[i:i + turns]:
            messages += [{"role": "user", "content": ask(t, s)}, {"role": "assistant", "content": text}]
        conversations.append(json.dumps({"messages": messages}) + "\n")
        i += turns
    return pc, "".join(conversations)


# A ChatML-shaped template on the tiny GPT-2's own vocabulary: each turn opens with its role and
# closes with the tokenizer's one special token, which is then the end of turn an answer stops at.
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}:\n{{ m['content'] }}<|endoftext|>{% endfor %}"
                 "{% if add_generation_prompt %}assistant:\n{% endif %}")


def chat_model() -> None:
    """tiny-chat: the tiny GPT-2, weights and tokenizer unchanged, with a chat template, so that
    chat data (data.format: messages) runs on a bundled model."""
    from transformers import AutoTokenizer

    out = HERE / "tiny-chat"
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(HERE / "tiny-gpt2", out)
    tok = AutoTokenizer.from_pretrained(out)
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(out)


# ---------------------------------------------------------------- lm-evaluation-harness tasks
# Each slot of a general sentence takes a noun phrase of one kind; the choices are one noun phrase
# of each kind, so every choice reads as English and only the domain's grammar tells them apart
# (chance is 25%).
CLOZE = {"place": PLACES, "thing": THINGS, "person": [f"the {job}" for job in JOBS], "name": NAMES}
TASK_SEED = SEED + 7  # items drawn apart from every corpus above: none is a training sentence


def cloze_items(r: random.Random, n: int) -> list[dict]:
    """Four choices, one of each kind (place, thing, person, name), the context's grammar picking the
    kind: a type the tiny model has learned. But "<a> felt <feeling> because" asks for a name other
    than a's (the corpus never repeats it there), and there a's own name stands in for the person:
    that rule the tiny model has barely learned (about half right), so the task leaves its pretrained
    score off the ceiling, with room to forget and to learn (issue #53)."""
    items = []
    while len(items) < n:
        a, b = r.sample(NAMES, 2)
        kind, opening = r.choice([
            ("place", f"{a} {r.choice(VERBS_GO)}"),
            ("thing", f"{a} {r.choice(VERBS_GET)}"),
            ("place", f"It was {r.choice(WEATHER)} {r.choice(TIMES)}, so {a} stayed at"),
            ("thing", f"{a} and {b} met at {r.choice(PLACES)} and talked about"),
            ("name", f"The {r.choice(JOBS)} told"),
            ("self", f"{a} felt {r.choice(FEELINGS)} because"),
            ("self", f"{a} felt {r.choice(FEELINGS)} because"),
        ])
        choices = [r.choice(CLOZE[k]) for k in CLOZE]  # one of each kind, in a fixed order
        if kind == "self":
            choices[list(CLOZE).index("person")], choices[list(CLOZE).index("name")], kind = a, b, "name"
        items.append({"context": opening, "choices": choices, "answer": list(CLOZE).index(kind)})
    return items


def completion_items(r: random.Random, n: int) -> list[dict]:
    """Openings of encyclopedia-domain sentences whose ending the domain's grammar fixes (or narrows
    to a few words), with that ending as the reference."""
    items = []
    while len(items) < n:
        name, year = proper(r), r.randint(1100, 1899)
        prompt, reference = r.choice([
            (f"The river is {number(r)} km long and drains a basin of {number(r)} square", "kilometres"),
            (f"The walls were {decimal(r)} metres thick and enclosed {number(r)} square", "metres"),
            (f"{name} was rebuilt in {year} after a fire destroyed the",
             f"{r.choice(['old', 'western', 'upper', 'main'])} quarter"),
            (f"As of the census of {year} , it had {number(r)}", "inhabitants"),
            (f"In the {r.choice(CENTURIES)} century , {name} became a centre of", f"trade for {r.choice(REGIONS)}"),
            (f"It lies {decimal(r)} km north @-@", f"east of {proper(r)}"),
        ])
        items.append({"prompt": prompt, "reference": reference})
    return items


TASK_YAML = {
    "tiny_cloze": """\
# Built by assets/build_assets.py: a multiple-choice cloze on unseen general-domain sentences
# (the tiny GPT-2's pretraining domain), so fine-tuning elsewhere shows as forgetting. lm-eval reads
# data_files from the working directory: run from the repo root, as dvc repro does.
task: tiny_cloze
dataset_path: json
dataset_kwargs:
  data_files:
    test: tasks/tiny_cloze.jsonl
test_split: test
output_type: multiple_choice
# doc_to_*: column names, read as they are (lm-eval renders a Jinja template afresh for every item).
doc_to_text: context
doc_to_choice: choices
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
""",
    "tiny_complete": """\
# Built by assets/build_assets.py: openings of encyclopedia-domain sentences (the fine-tuning
# domain) with their reference endings; greedy generation to the sentence's end, exact match.
task: tiny_complete
dataset_path: json
dataset_kwargs:
  data_files:
    test: tasks/tiny_complete.jsonl
test_split: test
output_type: generate_until
# doc_to_*: column names, read as they are (lm-eval renders a Jinja template afresh for every item).
doc_to_text: prompt
doc_to_target: reference
generation_kwargs:
  until: [" .", " ,", "\\n"]
  do_sample: false
  max_gen_toks: 12
filter_list:
  - name: strip
    filter:
      - function: remove_whitespace
      - function: take_first
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
""",
}


def task_files() -> None:
    """The demo's two tasks in the project's tasks/ folder (other files there are left alone)."""
    import json

    out = HERE.parent / "tasks"
    out.mkdir(exist_ok=True)
    r = random.Random(TASK_SEED)
    for name, items in (("tiny_cloze", cloze_items(r, 200)), ("tiny_complete", completion_items(r, 60))):
        (out / f"{name}.jsonl").write_text("".join(json.dumps(i) + "\n" for i in items), encoding="utf-8")
        (out / f"{name}.yaml").write_text(TASK_YAML[name], encoding="utf-8")


def derived() -> None:
    wiki = HERE / "tiny-wikitext"
    for name in ("tiny-jsonl", "tiny-instruct"):
        (HERE / name).mkdir(exist_ok=True)
    (HERE / "tiny-jsonl" / "articles.jsonl").write_text(articles_jsonl(wiki), encoding="utf-8")
    pc, messages = instructions(wiki)
    (HERE / "tiny-instruct" / "prompt_completion.jsonl").write_text(pc, encoding="utf-8")
    (HERE / "tiny-instruct" / "messages.jsonl").write_text(messages, encoding="utf-8")
    chat_model()
    task_files()
    print(f"wrote {HERE / 'tiny-jsonl'}, {HERE / 'tiny-instruct'}, {HERE / 'tiny-chat'} and {HERE.parent / 'tasks'}")


# ---------------------------------------------------------------- tokenizer and pretraining
def train_tokenizer(text_file: Path, out_dir: Path):
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2TokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train([str(text_file)], vocab_size=VOCAB_SIZE, min_frequency=2,
              special_tokens=["<|endoftext|>"], show_progress=False)
    tok = GPT2TokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<|endoftext|>",
                            eos_token="<|endoftext|>", unk_token="<|endoftext|>",
                            model_max_length=CONTEXT)
    tok.save_pretrained(out_dir)
    return tok


def pretrain(tok, text: str, out_dir: Path, steps: int = 800) -> None:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(SEED)
    ids = torch.tensor(tok(text)["input_ids"], dtype=torch.long)
    config = GPT2Config(vocab_size=len(tok), n_positions=CONTEXT, n_embd=64, n_layer=2, n_head=4,
                        bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    model = GPT2LMHeadModel(config)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.05)
    blocks = ids[: len(ids) // CONTEXT * CONTEXT].view(-1, CONTEXT)
    g = torch.Generator().manual_seed(SEED)
    model.train()
    for step in range(steps):
        batch = blocks[torch.randint(len(blocks), (32,), generator=g)]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 250 == 0 or step == steps - 1:
            print(f"pretrain step {step}: loss {loss.item():.3f}", file=sys.stderr)
    model.save_pretrained(out_dir)


def main() -> None:
    r = random.Random(SEED)
    general, wiki, model_dir = HERE / "tiny-general", HERE / "tiny-wikitext", HERE / "tiny-gpt2"
    for d in (general, wiki, model_dir):
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir()
    # Web text holds some encyclopedia pages too: 6 articles (about 2% of the tokens), so the
    # pretrained model has seen the format once in a while, as GPT-2 had, but is no expert in it.
    pretraining = general_corpus(r, 2400) + wiki_corpus(random.Random(SEED + 1), 6)
    (general / "train.txt").write_text(pretraining, encoding="utf-8")
    (general / "test.txt").write_text(general_corpus(r, 120), encoding="utf-8")
    for split, n in (("train", 100), ("valid", 20), ("test", 20)):
        (wiki / f"wiki.{split}.raw").write_text(wiki_corpus(r, n), encoding="utf-8")
    tok = train_tokenizer(general / "train.txt", model_dir)
    pretrain(tok, (general / "train.txt").read_text(encoding="utf-8"), model_dir)
    print(f"wrote {general}, {wiki} and {model_dir}")
    derived()


if __name__ == "__main__":
    derived() if sys.argv[1:] == ["derived"] else main()
