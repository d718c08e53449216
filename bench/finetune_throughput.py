"""Stage-2 training speed: memory bank with cached teacher outputs vs a live teacher forward every step,
and vs the student alone, all measured in one run (variants interleaved).

    DS_ACCELERATOR=cpu python bench/finetune_throughput.py [--shape=minilm] [--repeats=5] [--steps=5]

(a) student alone: CE finetuning of the student (no teacher, no CoDIR).
(b) live teacher: CE + KD + CoDIR, the teacher runs on every batch; negatives from the memory bank.
(c) cached: CE + KD + CoDIR, the teacher's features and logits read from the memory bank.
The one-time pass that fills the bank is timed too. Prints a Markdown table; medians of `repeats`.
"""

from __future__ import annotations

import copy
import csv
import random
import statistics
import tempfile
import time
from pathlib import Path

import fire
import torch
from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

from codir_ds.finetune.config import FinetuneConfig
from codir_ds.finetune.run import FinetuneStage, build_memory_bank, run_finetuning
from codir_ds.runtime.config import load_config

SHAPES = {  # teacher depth x width; the student keeps half the layers
    "tiny": dict(layers=4, hidden=64, heads=4, seq=32, batch=16),
    "minilm": dict(layers=6, hidden=384, heads=12, seq=64, batch=16),
    "base": dict(layers=12, hidden=768, heads=12, seq=128, batch=32),
}
VOCAB = [f"w{i}" for i in range(2000)]


def write_inputs(folder: Path, shape: dict, examples: int) -> tuple[Path, Path, Path]:
    """A random task teacher of `shape`, its tokenizer, and train/dev CSVs of fixed-length random texts."""
    teacher = folder / "teacher"
    teacher.mkdir(parents=True)
    (teacher / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *VOCAB]) + "\n")
    BertTokenizer(vocab=str(teacher / "vocab.txt")).save_pretrained(teacher)
    config = BertConfig(
        vocab_size=len(VOCAB) + 5,
        hidden_size=shape["hidden"],
        num_hidden_layers=shape["layers"],
        num_attention_heads=shape["heads"],
        intermediate_size=4 * shape["hidden"],
        num_labels=2,
    )
    BertForSequenceClassification(config).save_pretrained(teacher)
    rng = random.Random(0)
    files = []
    for name, count in (("train", examples), ("dev", 32)):
        path = folder / f"{name}.csv"
        with path.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["text", "label"])
            writer.writerows([" ".join(rng.choices(VOCAB, k=shape["seq"] - 2)), rng.choice("ab")] for _ in range(count))
        files.append(path)
    return teacher, files[0], files[1]


def build_run(folder: Path, teacher: Path, train: Path, dev: Path, shape: dict, distil: bool) -> FinetuneStage:
    overrides = {
        "task.train_file": str(train),
        "task.dev_files": [str(dev)],
        "task.max_seq_length": shape["seq"],
        "teacher.path": str(teacher),
        "teacher.live": True,
        "teacher.zero3": False,
        "student.init": "teacher_layers",
        "train.micro_batch_size": shape["batch"],
        "train.max_steps": 10_000,
        "train.deepspeed_config": "ds_configs/cpu_zero0.json",
        "eval.every": 10_000,
        "checkpoint.every": 0,
        "output.dir": str(folder),
        "output.export": False,
        "loss.alpha": 0.5 if distil else 0.0,
        "loss.beta": 1.0 if distil else 0.0,
    }
    return run_finetuning(load_config(FinetuneConfig, None, overrides), stop_after=1)


def seconds_per_step(step, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


def main(shape: str = "minilm", repeats: int = 5, steps: int = 5, examples: int = 512) -> None:
    torch.manual_seed(0)
    dims = SHAPES[shape]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        teacher, train, dev = write_inputs(folder, dims, examples)
        plain = build_run(folder / "plain", teacher, train, dev, dims, distil=False)
        codir = build_run(folder / "codir", teacher, train, dev, dims, distil=True)
        start = time.perf_counter()
        build_memory_bank(codir.teacher, codir.data, codir.tokenizer, codir.cfg)
        bank_seconds = time.perf_counter() - start
        cached = copy.copy(codir)  # the same run reading the teacher's outputs from the bank
        cached.teacher = None
        variants = {
            "(a) student alone (CE)": plain.micro_step,
            "(b) CE + KD + CoDIR, live teacher each step": codir.micro_step,
            "(c) CE + KD + CoDIR, memory bank + cached logits": cached.micro_step,
        }
        for step in variants.values():  # warm-up
            step()
        times = {name: [] for name in variants}
        for _ in range(repeats):
            for name, step in variants.items():
                times[name].append(seconds_per_step(step, steps))
    medians = {name: statistics.median(values) for name, values in times.items()}
    base = medians["(a) student alone (CE)"]
    print(
        f"shape {shape}: teacher {dims['layers']}x{dims['hidden']}, student {dims['layers'] // 2} layers, "
        f"batch {dims['batch']} x {dims['seq']} tokens, K={codir.cfg.codir.num_negatives}, "
        f"{torch.get_num_threads()} threads, median of {repeats} x {steps} steps\n"
    )
    print("| variant | ms/step | steps/s | vs student alone |\n| --- | ---: | ---: | ---: |")
    for name, seconds in medians.items():
        print(f"| {name} | {seconds * 1e3:.1f} | {1 / seconds:.2f} | {seconds / base:.2f}x |")
    live, cached = medians["(b) CE + KD + CoDIR, live teacher each step"], medians["(c) CE + KD + CoDIR, memory bank + cached logits"]
    print(
        f"\ncached / live step time: {cached / live:.2f} ({live / cached:.2f}x the steps/s); one-time bank pass over "
        f"{examples} examples: {bank_seconds:.1f} s (= {bank_seconds / (live - cached) if live > cached else float('nan'):.0f} steps' saving)"
    )


if __name__ == "__main__":
    fire.Fire(main)
