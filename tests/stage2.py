"""Helpers for stage-2 tests: a small labelled task (CSV), tiny task teachers, a run config."""
import csv
import json
import random
from pathlib import Path

import torch
from conftest import WORDS, tiny_bert_config, write_tokenizer
from transformers import BertForSequenceClassification

POSITIVE, NEGATIVE = WORDS[:6], WORDS[6:12]


def write_task(path: Path, examples: int, seed: int = 0, regression: bool = False) -> Path:
    """Sentences whose label is which of two word groups dominates (or, for regression, its share)."""
    rng = random.Random(seed)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        for _ in range(examples):
            share = rng.random()
            words = [rng.choice(POSITIVE if rng.random() < share else NEGATIVE) for _ in range(rng.randint(6, 14))]
            label = round(share, 3) if regression else ("pos" if share > 0.5 else "neg")
            writer.writerow([" ".join(words), label])
    return path


def save_task_teacher(folder: Path, layers: int = 4, num_labels: int = 2, seed: int = 0) -> Path:
    """A random BERT with a sequence-classification head: stands in for a finetuned teacher."""
    torch.manual_seed(seed)
    config = tiny_bert_config(layers)
    config.num_labels = num_labels
    BertForSequenceClassification(config).save_pretrained(folder)
    write_tokenizer(folder)
    return folder


def write_task_config(folder: Path, teacher: Path, train_file: Path, dev_file: Path, **sections) -> Path:
    raw = {
        "task": {"name": "custom", "train_file": str(train_file), "dev_files": [str(dev_file)], "max_seq_length": 24},
        "teacher": {"path": str(teacher)},
        "student": {"init": "teacher_layers", "num_layers": 2},
        "codir": {"projection_dim": 16, "num_negatives": 8, "queue_length": 32},
        "train": {"micro_batch_size": 8, "epochs": 1, "lr": 0.001},
        "eval": {"batch_size": 16},
        "logging": {"every": 1},
        "checkpoint": {"every": 0},
        "output": {"dir": str(folder / "out")},
    }
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "task.json"
    path.write_text(json.dumps(raw))
    return path
