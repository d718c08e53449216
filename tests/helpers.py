"""Shared test helpers: tiny random models saved as Hugging Face folders, corpora and tasks, run configs, the real
launcher, TensorBoard scalars."""

from __future__ import annotations

import csv
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import BertConfig, BertForMaskedLM, BertForSequenceClassification, BertModel, BertTokenizer

REPO = Path(__file__).resolve().parents[1]
WORDS = "the a of and to in is was for on that with as by at from his her it an are were be this which".split()


def tiny_bert_config(layers: int = 4, hidden: int = 32, vocab: int | None = None, dropout: float = 0.1) -> BertConfig:
    return BertConfig(
        vocab_size=vocab or len(WORDS) + 5,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=2 * hidden,
        max_position_embeddings=128,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )


def write_tokenizer(folder: Path, words=WORDS) -> BertTokenizer:
    folder.mkdir(parents=True, exist_ok=True)
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    tokenizer = BertTokenizer(vocab=str(vocab))
    tokenizer.save_pretrained(folder)
    return tokenizer


def save_tiny_model(folder: Path, layers: int = 4, hidden: int = 32, mlm_head: bool = True, seed: int = 0, dropout: float = 0.1) -> Path:
    """A random BERT (with or without MLM head) plus a word-level tokenizer, saved with save_pretrained."""
    torch.manual_seed(seed)
    config = tiny_bert_config(layers, hidden, dropout=dropout)
    model = BertForMaskedLM(config) if mlm_head else BertModel(config)
    model.save_pretrained(folder)
    write_tokenizer(folder)
    return folder


def train_tiny_teacher(folder: Path, corpus: Path, steps: int = 150, seed: int = 0) -> Path:
    """A tiny BERT whose MLM head is trained on `corpus` (plain PyTorch, masked-LM loss): a teacher whose logits
    carry knowledge, so that logit KD has something to teach."""
    save_tiny_model(folder, seed=seed, dropout=0.0)
    model, tokenizer = BertForMaskedLM.from_pretrained(folder), BertTokenizer.from_pretrained(folder)
    ids = tokenizer(corpus.read_text().splitlines(), truncation=True, max_length=32, padding="max_length", return_tensors="pt")["input_ids"]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small only loses time to thread synchronisation
    for _ in range(steps):
        batch = ids[torch.randint(len(ids), (32,), generator=generator)]
        selected = (torch.rand(batch.shape, generator=generator) < 0.15) & (batch > 4)  # ordinary tokens only
        loss = model(input_ids=batch.masked_fill(selected, tokenizer.mask_token_id), labels=batch.masked_fill(~selected, -100)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    torch.set_num_threads(threads)
    model.save_pretrained(folder)
    return folder


DISTRIBUTED_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def child_env(**extra) -> dict:
    """The environment for a child process: CPU DeepSpeed, and none of the rendezvous variables that an
    in-process run (a world of one) left in this test process."""
    env = {k: v for k, v in os.environ.items() if k not in DISTRIBUTED_VARIABLES}
    return {**env, "DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false", **extra}


def run_deepspeed(script: Path, args: list[str], ranks: int = 2, timeout: int = 600, env: dict | None = None):
    """Start `script` on `ranks` CPU ranks with the real `deepspeed` launcher; returns the CompletedProcess."""
    launcher = Path(sys.executable).with_name("deepspeed")
    full_env = child_env(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", **(env or {}))
    port = str(29500 + (os.getpid() % 2000))
    command = [str(launcher), "--num_gpus", str(ranks), "--master_port", port, str(script), *args]
    return subprocess.run(command, env=full_env, capture_output=True, text=True, timeout=timeout, cwd=REPO)


def read_json(path: Path):
    return json.loads(Path(path).read_text())


def launch_worker(worker: Path, config: Path, out: Path, *extra: str, ranks: int = 2) -> list[dict]:
    """Run a test worker on `ranks` ranks; return the facts each rank wrote to `out/rank{r}.json`."""
    result = run_deepspeed(worker, [f"--config={config}", f"--out={out}", *extra], ranks=ranks)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return [read_json(out / f"rank{r}.json") for r in range(ranks)]


def write_corpus(path: Path, documents: int = 300, seed: int = 0) -> Path:
    """Documents with one dominant word each: masked words are predictable and sequences distinguishable."""
    rng = random.Random(seed)
    lines = []
    for _ in range(documents):
        topic = rng.choice(WORDS)
        lines.append(" ".join(topic if rng.random() < 0.8 else rng.choice(WORDS) for _ in range(rng.randint(20, 60))))
    path.write_text("\n".join(lines) + "\n")
    return path


def write_run_config(folder: Path, teacher_path: Path, corpus: Path, **sections) -> Path:
    raw = {
        "teacher": {"path": str(teacher_path)},
        "data": {"files": [str(corpus)], "max_seq_length": 32},
        "codir": {"queue_length": 24, "projection_dim": 16},
        "train": {"micro_batch_size": 4, "max_steps": 6, "lr": 0.002},
        "logging": {"every": 1},
        "checkpoint": {"every": 3},
        "output": {"dir": str(folder / "out")},
    }
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    path = folder / "run.json"
    path.write_text(json.dumps(raw))
    return path


def tensorboard_scalars(log_dir: Path) -> dict[str, list[float]]:
    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {tag: [e.value for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


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


def plain_accuracy(export: Path, dev_file: Path, max_length: int = 24) -> float:
    """The dev accuracy of an exported classifier, scored by plain transformers in a process where codir_ds cannot be imported."""
    script = (
        "import sys, csv, torch; sys.modules['codir_ds'] = None\n"
        "from transformers import AutoModelForSequenceClassification, AutoTokenizer\n"
        f"model, tok = AutoModelForSequenceClassification.from_pretrained('{export}').eval(), AutoTokenizer.from_pretrained('{export}')\n"
        f"rows = list(csv.DictReader(open('{dev_file}')))\n"
        f"enc = tok([r['text'] for r in rows], padding=True, truncation=True, max_length={max_length}, return_tensors='pt')\n"
        "pred = model(**enc).logits.argmax(-1).tolist()\n"
        "print(sum(model.config.id2label[p] == r['label'] for p, r in zip(pred, rows)) / len(rows))\n"
    )
    loaded = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env={"HF_HUB_OFFLINE": "1", "PATH": ""})
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    return float(loaded.stdout.strip().splitlines()[-1])


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
