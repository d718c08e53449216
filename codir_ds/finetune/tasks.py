"""The task registry: GLUE tasks (text columns, labels, metric, file layout) and user-defined tasks."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Layout:
    """Where a task's splits live and what its columns are called there."""

    text_columns: tuple[str, ...]
    label_column: str
    train: str  # file name in task.data_dir, or hub split name
    dev: tuple[str, ...]  # one or more evaluation splits
    header: tuple[str, ...] | None = None  # column names of a file without a header row (CoLA)


@dataclass(frozen=True)
class TaskSpec:
    """One task: its label values (None for regression), its metrics (the first selects the best checkpoint)."""

    name: str
    labels: tuple[str, ...] | None
    metrics: tuple[str, ...]
    tsv: Layout | None = None  # the TSV files as GLUE distributes them
    hub: Layout | None = None  # `datasets.load_dataset("glue", name)`
    hub_path: tuple[str, str] = field(default=("glue", ""))


def _pair(first: str, second: str, label: str, train="train.tsv", dev=("dev.tsv",)) -> Layout:
    return Layout((first, second), label, train, dev)


def _glue(name: str, labels, metrics, tsv: Layout, hub_columns: tuple[str, ...], hub_dev=("validation",)) -> TaskSpec:
    return TaskSpec(name, labels, metrics, tsv, Layout(hub_columns, "label", "train", hub_dev), ("glue", name))


BINARY = ("0", "1")
ENTAILMENT = ("entailment", "not_entailment")
GLUE_TASKS: dict[str, TaskSpec] = {
    task.name: task
    for task in [
        _glue(
            "mnli",
            ("entailment", "neutral", "contradiction"),
            ("accuracy",),
            _pair("sentence1", "sentence2", "gold_label", dev=("dev_matched.tsv", "dev_mismatched.tsv")),
            ("premise", "hypothesis"),
            ("validation_matched", "validation_mismatched"),
        ),
        _glue("qqp", BINARY, ("f1", "accuracy"), _pair("question1", "question2", "is_duplicate"), ("question1", "question2")),
        _glue("qnli", ENTAILMENT, ("accuracy",), _pair("question", "sentence", "label"), ("question", "sentence")),
        _glue("sst2", BINARY, ("accuracy",), Layout(("sentence",), "label", "train.tsv", ("dev.tsv",)), ("sentence",)),
        _glue(
            "cola",
            BINARY,
            ("matthews",),
            Layout(("sentence",), "label", "train.tsv", ("dev.tsv",), header=("source", "label", "original_label", "sentence")),
            ("sentence",),
        ),
        _glue("stsb", None, ("pearson", "spearman"), _pair("sentence1", "sentence2", "score"), ("sentence1", "sentence2")),
        _glue("mrpc", BINARY, ("f1", "accuracy"), _pair("#1 String", "#2 String", "Quality"), ("sentence1", "sentence2")),
        _glue("rte", ENTAILMENT, ("accuracy",), _pair("sentence1", "sentence2", "label"), ("sentence1", "sentence2")),
    ]
}
ALIASES = {"sst-2": "sst2", "sts-b": "stsb", "mnli-m": "mnli"}
