"""Command line: `deepspeed launch/pretrain.py --config run.yaml --codir.temperature=0.05 ...`,
`deepspeed launch/finetune.py [teacher] --config task.yaml ...` and `python -m codir_ds export CHECKPOINT_DIR OUT_DIR`."""
from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

import fire

from .errors import CodirError


def pretrain(config: str | None = None, local_rank: int | None = None, **overrides: Any) -> None:
    """Stage 1. `config`: a JSON/YAML run config; any key can be overridden as --section.key=value."""
    from .config import load_config
    from .distributed import shutdown
    from .pretrain.config import PretrainConfig
    from .pretrain.run import run_pretraining

    run_pretraining(load_config(PretrainConfig, config, overrides))
    shutdown()


def finetune(command: str = "distill", config: str | None = None, local_rank: int | None = None, **overrides: Any) -> None:
    """Stage 2. `distill` (default): distil the finetuned teacher into the student on the task;
    `teacher`: finetune `teacher.path` on the task first (exported to <output.dir>/teacher)."""
    from .config import load_config
    from .distributed import shutdown
    from .finetune.config import FinetuneConfig
    from .finetune.run import run_finetuning, teacher_training_config

    if command not in ("distill", "teacher"):
        raise CodirError(f"unknown finetune command {command!r}; use 'distill' (the default) or 'teacher'")
    cfg = load_config(FinetuneConfig, config, overrides, validate=False)
    if command == "teacher":  # the student section does not apply: the teacher itself is trained
        cfg = teacher_training_config(cfg)
    cfg.validate()
    run_finetuning(cfg, export_name="teacher" if command == "teacher" else "student")
    shutdown()


def prepare(*sources: str, tokenizer: str = "", out: str = "", max_seq_length: int = 128, text_column: str = "text",
            num_proc: int = 1, shard: str = "0/1", dataset_config: str = "", split: str = "train", overwrite: bool = False) -> None:
    """Tokenise and pack a stage-1 corpus once: SOURCES (files, globs or one `datasets` hub name) -> a folder that
    `data.prepared` reads. `--tokenizer`: the teacher's folder; `--shard=i/n`: this job's part of n (SLURM arrays)."""
    from .pretrain.prepare import prepare_corpus

    if not tokenizer or not out:
        raise CodirError("prepare: give --tokenizer=<teacher folder> and --out=<prepared folder>")
    prepare_corpus(list(sources), tokenizer, out, max_seq_length, text_column, num_proc, str(shard), dataset_config, split, overwrite)


def export(checkpoint_dir: str, out_dir: str, tag: str | None = None) -> None:
    """Write the student of a codir-ds checkpoint folder (latest tag by default) as a Hugging Face folder."""
    from .export import export_student

    print(f"codir-ds: exported student to {export_student(checkpoint_dir, out_dir, tag)}")


def demo(out_dir: str = "runs/demo", max_steps: int = 120) -> None:
    """Prepare the embedded demo (MiniLM-L6 teacher, Wikipedia + news text) and print its config path."""
    from .demo import prepare_demo

    prepare_demo(out_dir, max_steps)


def demo_finetune(out_dir: str = "runs/demo_rt", student: str = "runs/demo/student") -> None:
    """Prepare the stage-2 demo (Rotten Tomatoes reviews; MiniLM-L6 teacher; the stage-1 demo's student)."""
    from .demo import prepare_finetune_demo

    prepare_finetune_demo(out_dir, student)


def report(teacher: str, student: str, batch_size: int = 32, seq_length: int = 64) -> None:
    """Compare two stage-2 exports: dev score, parameters and inference speed."""
    from .finetune.report import compare_teacher_student

    compare_teacher_student(teacher, student, batch_size, seq_length)


def run_command(command: Callable | dict[str, Callable], argv: list[str] | None = None) -> None:
    """Run a fire command; bad input ends the process with a one-line message and exit code 2."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        fire.Fire(command, command=argv, serialize=lambda _: None)
    except CodirError as err:
        print(f"codir-ds: error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)


def main() -> None:
    run_command({"prepare": prepare, "pretrain": pretrain, "finetune": finetune, "export": export, "demo": demo,
                 "demo_finetune": demo_finetune, "report": report})
