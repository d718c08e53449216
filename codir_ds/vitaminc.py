"""The VitaminC claim/evidence pairs (Schuster et al., 2021) as shipped inside BIG-bench's source distribution on
PyPI: 54,668 pairs from 3,068 Wikipedia titles, labelled True / False / Neither. Downloaded once (358 MB, read as
a stream: only the task's file is kept), cached, and split by title for `experiments/compare.py --data=vitaminc`."""

from __future__ import annotations

import hashlib
import json
import tarfile
import urllib.request
from pathlib import Path

from .demo import split_by_group, write_grouped_splits
from .runtime import files
from .runtime.errors import CodirError

SDIST = "https://files.pythonhosted.org/packages/95/f8/c019b3579df548a04cac12342cfcb878e50ddf6cfcd7fddba8cfc721c157/bigbench-1.0.0.tar.gz"
MEMBER = "bigbench-1.0.0/bigbench/benchmark_tasks/vitaminc_fact_verification/task.json"
TASK_SHA256 = "10f83da50374701fc7ce69162a7a167b14e1a86351201aa8bf14b56fa0a3214f"
CACHE = Path.home() / ".cache" / "codir-ds" / "vitaminc_task.json"
LABELS = ["True", "False", "Neither"]


def vitaminc_task(cache: Path = CACHE) -> Path:
    """The cached `task.json`, fetched from the bigbench sdist on first use and checked against its digest."""
    if not cache.is_file():
        print(f"codir-ds: fetching VitaminC from {SDIST} (358 MB, once)", flush=True)
        try:
            with urllib.request.urlopen(SDIST) as response, tarfile.open(fileobj=response, mode="r|gz") as archive:
                data = next((archive.extractfile(m).read() for m in archive if m.name == MEMBER), None)
        except OSError as err:
            raise CodirError(f"vitaminc: cannot fetch {SDIST} ({err}); copy task.json from a bigbench sdist to {cache}") from None
        if data is None:
            raise CodirError(f"vitaminc: {SDIST} has no {MEMBER}")
        cache.parent.mkdir(parents=True, exist_ok=True)
        files.write_bytes(cache, data)
    if hashlib.sha256(cache.read_bytes()).hexdigest() != TASK_SHA256:
        raise CodirError(f"vitaminc: {cache} is not the bigbench 1.0.0 task file (digest differs); delete it to fetch it again")
    return cache


def vitaminc_pairs(task: Path) -> list[dict[str, str]]:
    """{text (the evidence), text_pair (the claim), label, title} of every example of a BIG-bench VitaminC `task.json`,
    whose inputs read "<title>: <evidence>\\nClaim: <claim>"."""
    pairs = []
    for example in json.loads(task.read_text())["examples"]:
        head, _, claim = example["input"].rpartition("\nClaim: ")
        title, _, evidence = head.partition(": ")
        scores = example["target_scores"]
        pairs.append({"text": evidence, "text_pair": claim, "label": max(scores, key=scores.get), "title": title})
    return pairs


def write_vitaminc_by_title(out: Path, train_examples: int, dev_examples: int, test_examples: int, task: Path | None = None) -> dict[str, Path]:
    """`test.csv`, `dev.csv` and `train.csv` (columns text, text_pair, label, title) split by Wikipedia title: no
    title and no pair in two splits."""
    sizes = {"test": test_examples, "dev": dev_examples, "train": train_examples}
    return write_grouped_splits(out, split_by_group(vitaminc_pairs(task or vitaminc_task()), sizes, "title"), "title")
