"""Task data: GLUE files as GLUE distributes them, custom CSVs, label mapping, per-rank batches, clear errors."""

import pytest
import torch
from helpers import write_task

from codir_ds.finetune.config import TaskConfig
from codir_ds.finetune.data import EpochBatches, load_task_data, resolve_task
from codir_ds.models.loading import load_tokenizer
from codir_ds.runtime.errors import CodirError


@pytest.fixture(scope="module")
def tokenizer(tiny_teacher):
    return load_tokenizer(str(tiny_teacher), "teacher.path")


def write_tsv(path, rows):
    path.write_text("\n".join("\t".join(map(str, row)) for row in rows) + "\n")


def load(cfg, tokenizer):
    return load_task_data(resolve_task(cfg), tokenizer, max_length=16)


def test_mnli_files_as_glue_ships_them(tmp_path, tokenizer):
    header = ["index", "promptID", "pairID", "genre", "sentence1", "sentence2", "label1", "gold_label"]
    write_tsv(
        tmp_path / "train.tsv",
        [
            header,
            [0, 1, 2, "fiction", 'the "a" of', "and to", "neutral", "neutral"],
            [1, 1, 2, "fiction", "in is", "was for", "contradiction", "contradiction"],
        ],
    )
    for name, label in (("dev_matched", "entailment"), ("dev_mismatched", "contradiction")):
        write_tsv(tmp_path / f"{name}.tsv", [header, [0, 1, 2, "x", "the a", "of and", label, label]])
    data = load(TaskConfig(name="MNLI", data_dir=str(tmp_path)), tokenizer)
    assert data.task.labels == ("entailment", "neutral", "contradiction")
    assert data.task.metrics == ("accuracy",)
    assert data.train["label"] == [1, 2]  # GLUE's label order
    assert list(data.dev) == ["dev_matched", "dev_mismatched"]
    assert data.dev["dev_matched"]["label"] == [0]
    assert data.dev["dev_mismatched"]["label"] == [2]
    assert data.train[0]["token_type_ids"].count(1) > 0  # a sentence pair: the second segment is marked


def test_headerless_cola_and_regression_stsb(tmp_path, tokenizer):
    (tmp_path / "cola").mkdir()
    write_tsv(tmp_path / "cola" / "train.tsv", [["gj04", 1, "", "the a of"], ["gj04", 0, "*", "of of the"]])
    write_tsv(tmp_path / "cola" / "dev.tsv", [["gj04", 1, "", "a the"]])
    cola = load(TaskConfig(name="cola", data_dir=str(tmp_path / "cola")), tokenizer)
    assert cola.train["label"] == [1, 0]
    assert cola.task.metrics == ("matthews",)
    (tmp_path / "stsb").mkdir()
    header = ["index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1", "sentence2", "score"]
    write_tsv(tmp_path / "stsb" / "train.tsv", [header, [0, "g", "f", 2012, 1, "s", "s", "the a", "a the", 3.8]])
    write_tsv(tmp_path / "stsb" / "dev.tsv", [header, [0, "g", "f", 2012, 1, "s", "s", "of", "and", "0.25"]])
    stsb = load(TaskConfig(name="sts-b", data_dir=str(tmp_path / "stsb")), tokenizer)
    assert stsb.task.regression
    assert stsb.task.num_labels == 1
    assert stsb.task.metrics == ("pearson", "spearman")
    assert stsb.train["label"] == [pytest.approx(3.8)]
    assert stsb.dev["dev"]["label"] == [pytest.approx(0.25)]


def test_custom_csv_labels_default_to_the_sorted_train_values(tmp_path, tokenizer):
    train, dev = write_task(tmp_path / "train.csv", 30), write_task(tmp_path / "dev.csv", 10, seed=1)
    data = load(TaskConfig(train_file=str(train), dev_files=[str(dev)]), tokenizer)
    assert data.task.labels == ("neg", "pos")
    raw = [line.rsplit(",", 1)[1] for line in train.read_text().splitlines()[1:]]
    assert data.train["label"] == [("neg", "pos").index(label) for label in raw]
    assert data.train["idx"] == list(range(30))


@pytest.mark.parametrize(
    "change, expected",
    [
        ({"text_columns": ["sentence"]}, "task.text_columns: no column 'sentence' in .*train.csv; its columns are \\['text', 'label'\\]"),
        ({"label_column": "category"}, "task.label_column: no column 'category' in .*train.csv"),
        ({"labels": ["pos"]}, "task: .*train.csv has labels \\['neg'\\] that are not among the task's labels \\['pos'\\]"),
        ({"train_file": "/nowhere/train.csv"}, "task: no such file /nowhere/train.csv"),
        ({"name": "sst3"}, "task.name: unknown task 'sst3'; choose from mnli, qqp"),
        ({"dev_files": []}, "task.train_file and task.dev_files: a custom task needs"),
        ({"name": "rte"}, "task.data_dir: give the folder of the rte GLUE files"),
    ],
)
def test_bad_task_input_names_the_problem(tmp_path, tokenizer, change, expected):
    train, dev = write_task(tmp_path / "train.csv", 20), write_task(tmp_path / "dev.csv", 5)
    base = {"train_file": str(train), "dev_files": [str(dev)]}
    if change.get("name") == "rte":
        base = {}
    with pytest.raises(CodirError, match=expected):
        load(TaskConfig(**{**base, **change}), tokenizer)


def test_unknown_label_in_the_eval_set_and_empty_split(tmp_path, tokenizer):
    train = write_task(tmp_path / "train.csv", 20)
    (tmp_path / "dev.csv").write_text("text,label\nthe a,pos\nof and,maybe\n")
    with pytest.raises(CodirError, match="dev.csv has labels \\['maybe'\\] that are not among the task's labels \\['neg', 'pos'\\]"):
        load(TaskConfig(train_file=str(train), dev_files=[str(tmp_path / "dev.csv")]), tokenizer)
    (tmp_path / "empty.csv").write_text("text,label\n")
    with pytest.raises(CodirError, match="empty.csv holds no examples"):
        load(TaskConfig(train_file=str(train), dev_files=[str(tmp_path / "empty.csv")]), tokenizer)


def test_epoch_batches_split_each_epoch_across_ranks_and_resume(tmp_path, tokenizer):
    data = load(TaskConfig(train_file=str(write_task(tmp_path / "t.csv", 50)), dev_files=[str(write_task(tmp_path / "d.csv", 5))]), tokenizer)
    ranks = [EpochBatches(data.train, tokenizer, 4, r, 2, seed=7) for r in range(2)]
    assert ranks[0].per_epoch == 6  # 50 // (4 x 2): the short last global batch is dropped
    seen = [[b["idx"].tolist() for b in (r.next_batch() for _ in range(6))] for r in ranks]
    epoch0 = [i for rank in seen for batch in rank for i in batch]
    assert len(epoch0) == len(set(epoch0)) == 48
    state = ranks[0].state_dict()
    after = [ranks[0].next_batch()["idx"].tolist() for _ in range(3)]
    assert ranks[0].epoch == 1
    assert after[0] != seen[0][0]
    resumed = EpochBatches(data.train, tokenizer, 4, 0, 2, seed=7)
    resumed.load_state_dict(state)
    assert [resumed.next_batch()["idx"].tolist() for _ in range(3)] == after
    batch = ranks[1].next_batch()
    assert batch["input_ids"].shape == batch["attention_mask"].shape
    assert batch["labels"].dtype == torch.long
