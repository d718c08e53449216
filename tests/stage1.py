"""Helpers for stage-1 tests: a small real-text-like corpus, a run config, reading TensorBoard scalars."""
import json
import random
from pathlib import Path

from conftest import WORDS
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def write_corpus(path: Path, documents: int = 300, seed: int = 0) -> Path:
    """Documents with one dominant word each: masked words are predictable and sequences distinguishable."""
    rng = random.Random(seed)
    lines = []
    for _ in range(documents):
        topic = rng.choice(WORDS)
        lines.append(" ".join(topic if rng.random() < 0.8 else rng.choice(WORDS) for _ in range(rng.randint(20, 60))))
    path.write_text("\n".join(lines) + "\n")
    return path


def write_run_config(folder: Path, teacher: Path, corpus: Path, **sections) -> Path:
    raw = {
        "teacher": {"path": str(teacher)},
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
