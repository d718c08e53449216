"""Command line: `deepspeed launch/pretrain.py --config run.yaml --codir.temperature=0.05 ...`,
`deepspeed launch/finetune.py [teacher] --config task.yaml ...` and `python -m codir_ds export CHECKPOINT_DIR OUT_DIR`.
Each takes --help (-h); that of a run command lists every config key, generated from its config dataclass."""

from __future__ import annotations

import inspect
import os
import sys
import textwrap
import typing
from collections.abc import Callable
from typing import Any, Literal

import fire

from .finetune.config import FinetuneConfig
from .pretrain.config import PretrainConfig
from .runtime.config import config_help, type_name
from .runtime.errors import CodirError, error_line

HELP_FLAGS = {"--help", "-h"}
CONFIG_CLASSES = {"pretrain": PretrainConfig, "finetune": FinetuneConfig}  # the run commands and their configs


def pretrain(config: str | None = None, local_rank: int | None = None, **overrides: Any) -> None:
    """Stage 1: CoDIR pre-training distillation of the teacher into a smaller student.

    `config`: a JSON/YAML run config of the sections below; any key can be overridden as --section.key=value."""
    from .runtime.config import load_config

    cfg = load_config(PretrainConfig, config, overrides)  # a bad key fails here, before the heavy imports below
    from .pretrain.run import run_pretraining
    from .runtime.distributed import shutdown

    run = run_pretraining(cfg)
    shutdown()
    _exit_if_stopped(run.stopped)


def finetune(command: Literal["distill", "teacher"] = "distill", config: str | None = None, local_rank: int | None = None, **overrides: Any) -> None:
    """Stage 2: task finetuning distillation of the task-finetuned teacher into the student.

    `distill` (default): distil the finetuned teacher into the student on the task; `teacher`: finetune
    `teacher.path` on the task first (exported to <output.dir>/teacher; the student section and loss.alpha/beta
    do not apply). `config`: a JSON/YAML run config of the sections below; any key can be overridden as
    --section.key=value."""
    from .runtime.config import load_config

    if command not in ("distill", "teacher"):
        raise CodirError(f"unknown finetune command {command!r}; use 'distill' (the default) or 'teacher'")
    cfg = load_config(FinetuneConfig, config, overrides, validate=False)
    from .finetune.run import run_finetuning, teacher_training_config
    from .runtime.distributed import shutdown  # after the config: a bad key fails before these heavy imports

    if command == "teacher":  # the student section does not apply: the teacher itself is trained
        cfg = teacher_training_config(cfg)
    cfg.validate()
    run = run_finetuning(cfg, export_name="teacher" if command == "teacher" else "student")
    shutdown()
    _exit_if_stopped(run.stopped)


def _exit_if_stopped(stopped: bool) -> None:
    """A run stopped before train.max_steps exits with EXIT_STOPPED: not done, resumable (requeue, not failure)."""
    from .runtime.preemption import EXIT_STOPPED

    if stopped:
        sys.exit(EXIT_STOPPED)


def prepare(
    *sources: str,
    tokenizer: str = "",
    out: str = "",
    max_seq_length: int = 128,
    text_column: str = "text",
    num_proc: int = 1,
    shard: str = "0/1",
    dataset_config: str = "",
    split: str = "train",
    overwrite: bool = False,
) -> None:
    """Tokenise and pack a stage-1 corpus once into a folder that `data.prepared` reads.

    SOURCES: files, globs or one `datasets` hub name. `--tokenizer`: the teacher's folder; `--out`: the folder to
    write; `--shard=i/n`: this job's part of n (SLURM arrays)."""
    from .pretrain.prepare import prepare_corpus

    if not tokenizer or not out:
        raise CodirError("prepare: give --tokenizer=<teacher folder> and --out=<prepared folder>")
    prepare_corpus(list(sources), tokenizer, out, max_seq_length, text_column, num_proc, str(shard), dataset_config, split, overwrite)


def export(checkpoint_dir: str, out_dir: str, tag: str | None = None, overwrite: bool = False) -> None:
    """Write the student of a codir-ds checkpoint folder (latest tag by default) as a Hugging Face folder.

    OUT_DIR must be new or empty; `--overwrite=true` replaces it whole."""
    from .runs.export import export_student

    print(f"codir-ds: exported student to {export_student(checkpoint_dir, out_dir, tag, overwrite)}")


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


def command_help(command: Callable, prog: str) -> str:
    """Usage line, docstring and arguments of a command; for a run command also every config key."""
    hints, usage, rows = typing.get_type_hints(command), [prog], []
    for param in inspect.signature(command).parameters.values():
        hint = hints.get(param.name)
        if param.kind is param.VAR_KEYWORD:
            usage.append("[--section.key=value ...]")
        elif param.name != "local_rank":  # set by the deepspeed launcher
            if param.kind is param.VAR_POSITIONAL:
                usage.append(f"{param.name.upper()} ...")
            elif param.default is param.empty:
                usage.append(param.name.upper())
            elif typing.get_origin(hint) is Literal:  # a sub-command, given by position
                usage.append(f"[{'|'.join(typing.get_args(hint))}]")
            else:
                usage.append(f"[--{param.name}={param.name.upper()}]")
            name = f"{param.name.upper()} ..." if param.kind is param.VAR_POSITIONAL else f"--{param.name}"
            default = "" if param.default is param.empty else '""' if param.default == "" else str(param.default)
            rows.append(f"  {name:<18} {type_name(hint):<16} {default}".rstrip())
    text = [textwrap.fill(" ".join(usage), 110, initial_indent="usage: ", subsequent_indent="  "), "", inspect.getdoc(command)]
    text += ["", "arguments (by position, or as --name=value):", *rows] if rows else []
    if command.__name__ in CONFIG_CLASSES:
        text += [
            "",
            "config keys: `section: {key: value}` in the --config file, --section.key=value on the command line",
            "",
            config_help(CONFIG_CLASSES[command.__name__]),
        ]
    return "\n".join(text)


def commands_help(commands: dict[str, Callable]) -> str:
    lines = ["usage: codir-ds COMMAND [ARGS ...]   (codir-ds COMMAND --help for one command's arguments)", "", "commands:"]
    return "\n".join(lines + [f"  {name:<14} {inspect.getdoc(fn).splitlines()[0]}" for name, fn in commands.items()])


def run_command(command: Callable | dict[str, Callable], argv: list[str] | None = None) -> None:
    """Run a fire command; bad input ends the process with a one-line message and exit code 2.
    --help or -h anywhere (or no command at all for several) prints help instead and returns."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = sys.argv[1:] if argv is None else list(argv)
    several = isinstance(command, dict)
    if several and (not argv or (argv[0] not in command and HELP_FLAGS & set(argv))):
        print(commands_help(command))
        return
    if HELP_FLAGS & set(argv):
        print(command_help(command[argv[0]], f"codir-ds {argv[0]}") if several else command_help(command, sys.argv[0]))
        return
    try:
        fire.Fire(command, command=argv, serialize=lambda _: None)
    except CodirError as err:
        print(f"codir-ds: error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
    except OSError as err:  # a full disk, a folder without write permission: the system's words and the path
        print(f"codir-ds: error: {err.strerror or type(err).__name__}: {err.filename or error_line(err)}", file=sys.stderr, flush=True)
        sys.exit(2)
    except KeyboardInterrupt:  # the second Ctrl-C
        print("codir-ds: aborted (second Ctrl-C): the steps since the last checkpoint are lost", file=sys.stderr, flush=True)
        sys.exit(130)


def main() -> None:
    run_command(
        {
            "prepare": prepare,
            "pretrain": pretrain,
            "finetune": finetune,
            "export": export,
            "demo": demo,
            "demo_finetune": demo_finetune,
            "report": report,
        }
    )
