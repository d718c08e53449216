"""Stage-2 data: a task's splits read through `datasets`, labels mapped to ids, tokenised, and batched per rank."""

from __future__ import annotations

import csv
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import torch
from transformers import PreTrainedTokenizerBase

from ..runtime.distributed import print0
from ..runtime.errors import CodirError, error_line
from .config import TaskConfig
from .metrics import REGRESSION_METRICS
from .tasks import ALIASES, GLUE_TASKS, Layout

_READERS = {".tsv": "csv", ".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


@dataclass(frozen=True)
class Source:
    """One split: a local file (with an optional header for header-less TSVs) or a hub dataset split."""

    name: str  # the split's name in logs: file stem or hub split
    file: str = ""
    header: tuple[str, ...] | None = None
    hub: tuple[str, str] | None = None
    split: str = ""


@dataclass(frozen=True)
class Task:
    """A task resolved from the config: columns, labels (None = regression), metrics and split sources."""

    name: str
    text_columns: tuple[str, ...]
    label_column: str
    labels: tuple[str, ...] | None
    metrics: tuple[str, ...]
    train: Source
    dev: tuple[Source, ...]

    @property
    def regression(self) -> bool:
        return self.labels is None

    @property
    def num_labels(self) -> int:
        return 1 if self.labels is None else len(self.labels)


def resolve_task(cfg: TaskConfig) -> Task:
    """The task's columns, labels, metrics and sources: registry defaults, overridden by the config."""
    name = ALIASES.get(cfg.name.lower(), cfg.name.lower())
    if name == "custom":
        if not cfg.train_file or not cfg.dev_files:
            raise CodirError("task.train_file and task.dev_files: a custom task needs its training and evaluation files")
        labels = None if cfg.regression else (tuple(cfg.labels) or ())  # () = infer from the train set
        layout = Layout(tuple(cfg.text_columns or ["text"]), cfg.label_column or "label", cfg.train_file, tuple(cfg.dev_files))
        metrics = tuple(cfg.metrics) or (REGRESSION_METRICS if cfg.regression else ("accuracy",))
        return _task(name, layout, labels, metrics, cfg, hub=None)
    if name not in GLUE_TASKS:
        raise CodirError(f"task.name: unknown task {cfg.name!r}; choose from {', '.join(GLUE_TASKS)} or custom")
    spec = GLUE_TASKS[name]
    if cfg.hub:
        return _task(name, spec.hub, spec.labels, tuple(cfg.metrics) or spec.metrics, cfg, hub=spec.hub_path)
    if not cfg.data_dir and not (cfg.train_file and cfg.dev_files):
        raise CodirError(f"task.data_dir: give the folder of the {name} GLUE files (or task.hub=True, or task.train_file/dev_files)")
    return _task(name, spec.tsv, spec.labels, tuple(cfg.metrics) or spec.metrics, cfg, hub=None)


def _task(name: str, layout: Layout, labels, metrics, cfg: TaskConfig, hub) -> Task:
    columns = tuple(cfg.text_columns) or layout.text_columns
    label_column = cfg.label_column or layout.label_column
    if hub:
        train = Source(layout.train, hub=hub, split=layout.train)
        dev = tuple(Source(split, hub=hub, split=split) for split in layout.dev)
    else:

        def source(file: str) -> Source:
            path = Path(cfg.data_dir, file) if cfg.data_dir and not Path(file).is_absolute() else Path(file)
            return Source(path.name.split(".")[0], str(path), header=None if cfg.train_file or cfg.dev_files else layout.header)

        train = source(cfg.train_file or layout.train)
        dev = tuple(source(f) for f in (cfg.dev_files or layout.dev))
    return Task(name, columns, label_column, labels, metrics, train, dev)


@dataclass
class TaskData:
    """Tokenised splits: `input_ids`, `attention_mask` (and `token_type_ids`), `label`, `idx`."""

    task: Task
    train: datasets.Dataset
    dev: dict[str, datasets.Dataset]


def load_task_data(
    task: Task, tokenizer: PreTrainedTokenizerBase, max_length: int, max_train: int = 0, max_eval: int = 0, drop_unlabelled: bool = False
) -> TaskData:
    """Read, check, label-map and tokenise every split; raises `CodirError` naming the split on bad input
    (missing labels, unless `drop_unlabelled`; a training set of fewer than two classes)."""

    def read(source: Source, limit: int) -> datasets.Dataset:
        return _labelled(_limit(_read(source, task), limit), task, source, drop_unlabelled)

    raw_train = read(task.train, max_train)
    if task.labels == ():  # custom task without configured labels: the train set's values, sorted
        task = _with_labels(task, tuple(sorted({label_text(v) for v in raw_train[task.label_column]})))
    train = _prepare(raw_train, task, task.train, tokenizer, max_length)
    if not task.regression and len(set(train["label"])) < 2:
        raise CodirError(
            f"task: every example of {task.train.file or task.train.split} has label {task.labels[train['label'][0]]!r}; "
            f"a classifier needs at least two classes"
        )
    dev = {source.name: _prepare(read(source, max_eval), task, source, tokenizer, max_length) for source in task.dev}
    return TaskData(task, train, dev)


def label_text(value: Any) -> str:
    """A label cell as text: 1.0 (an integer column that a missing cell turned into floats) reads as "1"."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or (isinstance(value, str) and not value.strip())


def _labelled(split: datasets.Dataset, task: Task, source: Source, drop: bool) -> datasets.Dataset:
    """The split without label-less rows when `drop`; otherwise a `CodirError` naming them."""
    what = source.file or source.split
    missing = [i for i, value in enumerate(split[task.label_column]) if _missing(value)]
    if not missing:
        return split
    if not drop:
        rows = ", ".join(str(i + 1) for i in missing[:8]) + (", ..." if len(missing) > 8 else "")
        raise CodirError(
            f"task: {what} has {len(missing)} example(s) without a label (example {rows}, counted from 1); "
            f"fill them in, or pass --task.drop_unlabelled=true to leave them out"
        )
    print0(f"codir-ds: task: {what}: left out {len(missing)} example(s) without a label (task.drop_unlabelled)")
    keep = sorted(set(range(len(split))) - set(missing))
    if not keep:
        raise CodirError(f"task: {what} has no labelled example")
    return split.select(keep)


def _with_labels(task: Task, labels: tuple[str, ...]) -> Task:
    return Task(task.name, task.text_columns, task.label_column, labels, task.metrics, task.train, task.dev)


def _limit(split: datasets.Dataset, count: int) -> datasets.Dataset:
    return split.select(range(min(count, len(split)))) if count else split


def _read(source: Source, task: Task) -> datasets.Dataset:
    what = source.file or f"{source.hub[0]}/{source.hub[1]}:{source.split}"
    try:
        if source.hub:
            split = datasets.load_dataset(*source.hub, split=source.split)
        else:
            split = datasets.load_dataset(_reader(source.file), data_files=source.file, split="train", **_reader_options(source))
    except CodirError:
        raise
    except Exception as err:  # datasets/pyarrow/pandas raise many types for unreadable files
        if "corresponds to no data" in str(err):  # how `datasets` reports a file with a header only
            raise CodirError(f"task: {what} holds no examples") from None
        raise CodirError(f"task: cannot read {what}: {type(err).__name__}: {error_line(err, limit=200)}") from None
    missing = [c for c in (*task.text_columns, task.label_column) if c not in split.column_names]
    if missing:
        key = "task.label_column" if missing == [task.label_column] else "task.text_columns"
        raise CodirError(f"{key}: no column {missing[0]!r} in {what}; its columns are {split.column_names}")
    if len(split) == 0:
        raise CodirError(f"task: {what} holds no examples")
    return split


def _reader(file: str) -> str:
    path = Path(file)
    if not path.is_file():
        raise CodirError(f"task: no such file {file}")
    suffix = "".join(path.suffixes[-2:-1] if path.suffix in (".gz", ".bz2", ".xz") else path.suffixes[-1:])
    if suffix not in _READERS:
        raise CodirError(f"task: unsupported file type {file} (use {', '.join(sorted(_READERS))}, optionally compressed)")
    return _READERS[suffix]


def _reader_options(source: Source) -> dict[str, Any]:
    if ".tsv" not in Path(source.file).suffixes:
        return {}
    options: dict[str, Any] = {"delimiter": "\t", "quoting": csv.QUOTE_NONE, "keep_default_na": False}
    if source.header:
        options["column_names"] = list(source.header)
    return options


def _prepare(split: datasets.Dataset, task: Task, source: Source, tokenizer, max_length: int) -> datasets.Dataset:
    label_ids = _label_ids(split, task, source)
    split = split.select_columns(list(task.text_columns)).add_column("label", label_ids).add_column("idx", list(range(len(split))))

    empty = {c: sum(1 for text in split[c] if not isinstance(text, str) or not text.strip()) for c in task.text_columns}
    if any(empty.values()):
        counts = ", ".join(f"{n} in column {c!r}" for c, n in empty.items() if n)
        print0(f"codir-ds: task: {source.file or source.split}: empty text cells ({counts}) are read as empty texts")

    def tokenize(rows):
        texts = [[text if isinstance(text, str) else "" for text in rows[column]] for column in task.text_columns]
        return tokenizer(*texts, truncation=True, max_length=max_length)

    return split.map(tokenize, batched=True, remove_columns=list(task.text_columns), desc=f"tokenising {source.name}")


def _label_ids(split: datasets.Dataset, task: Task, source: Source) -> list:
    values = split[task.label_column]
    what = source.file or source.split
    if task.regression:
        try:
            return [float(v) for v in values]
        except (TypeError, ValueError):
            bad = next(v for v in values if not _is_number(v))
            raise CodirError(f"task: {what} has a non-numeric label {bad!r} for a regression task") from None
    feature = split.features[task.label_column]
    if isinstance(feature, datasets.ClassLabel):  # hub datasets: ids already, names in the task's order
        values = [feature.names[v] if v >= 0 else "<unlabelled>" for v in values]
    index = {label: i for i, label in enumerate(task.labels)}
    unknown = sorted({label_text(v) for v in values} - set(index))
    if unknown:
        raise CodirError(f"task: {what} has labels {unknown[:5]} that are not among the task's labels {list(task.labels)}")
    return [index[label_text(v)] for v in values]


def _is_number(value: Any) -> bool:
    try:
        float(value)
        return True
    except (TypeError, ValueError):
        return False


def collate(split: datasets.Dataset, indices: list[int], tokenizer: PreTrainedTokenizerBase) -> dict[str, torch.Tensor]:
    """The rows at `indices`, padded to the longest: model inputs plus `labels` and `idx` tensors."""
    rows = split[indices]
    inputs = {k: rows[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in rows}
    batch = dict(tokenizer.pad(inputs, return_tensors="pt"))
    batch["labels"] = torch.tensor(rows["label"])
    batch["idx"] = torch.tensor(rows["idx"], dtype=torch.long)
    return batch


def padded_shards(count: int, rank: int, world_size: int, batch_size: int) -> Iterator[tuple[list[int], int]]:
    """This rank's share of `count` rows in batches, as (indices, number of real rows).

    Every rank yields the same number of batches (ZeRO-3 forwards are collective): a rank with no rows
    left repeats row 0 and reports 0 real rows.
    """
    mine = list(range(rank, count, world_size))
    for start in range(0, math.ceil(math.ceil(count / world_size) / batch_size) * batch_size, batch_size):
        chunk = mine[start : start + batch_size]
        yield (chunk or [0]), len(chunk)


class EpochBatches:
    """Training micro-batches of this rank: a new shuffle each epoch, equal batch counts on every rank, resumable."""

    def __init__(self, split: datasets.Dataset, tokenizer, batch_size: int, rank: int, world_size: int, seed: int):
        self.split, self.tokenizer, self.batch_size = split, tokenizer, batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.per_epoch = len(split) // (batch_size * world_size)  # a short last global batch is dropped
        if self.per_epoch == 0:
            raise CodirError(
                f"task: the training set has {len(split)} examples, fewer than one global batch "
                f"({batch_size} x {world_size} ranks); lower train.micro_batch_size"
            )
        self.epoch, self.position = 0, 0
        self._order: tuple[int, torch.Tensor] | None = None  # (epoch, shuffled row order)

    def next_batch(self) -> dict[str, torch.Tensor]:
        if self.position == self.per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
        if self._order is None or self._order[0] != self.epoch:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            self._order = (self.epoch, torch.randperm(len(self.split), generator=generator))
        start = (self.position * self.world_size + self.rank) * self.batch_size
        self.position += 1
        return collate(self.split, self._order[1][start : start + self.batch_size].tolist(), self.tokenizer)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = state["epoch"], state["position"]
