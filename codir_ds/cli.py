"""Command line: `deepspeed launch/pretrain.py --config run.yaml --codir.temperature=0.05 ...` and
`python -m codir_ds export CHECKPOINT_DIR OUT_DIR`."""
from __future__ import annotations

import os
import sys
from typing import Any, Callable

import fire

from .errors import CodirError


def pretrain(config: str | None = None, local_rank: int | None = None, **overrides: Any) -> None:
    """Stage 1. `config`: a JSON/YAML run config; any key can be overridden as --section.key=value."""
    from .config import PretrainConfig, load_config
    from .distributed import shutdown
    from .pretrain import run_pretraining

    run_pretraining(load_config(PretrainConfig, config, overrides))
    shutdown()


def export(checkpoint_dir: str, out_dir: str, tag: str | None = None) -> None:
    """Write the student of a codir-ds checkpoint folder (latest tag by default) as a Hugging Face folder."""
    from .export import export_student

    print(f"codir-ds: exported student to {export_student(checkpoint_dir, out_dir, tag)}")


def demo(out_dir: str = "runs/demo", max_steps: int = 120) -> None:
    """Prepare the embedded demo (MiniLM-L6 teacher, Wikipedia + news text) and print its config path."""
    from .demo import prepare_demo

    prepare_demo(out_dir, max_steps)


def run_command(command: Callable | dict[str, Callable], argv: list[str] | None = None) -> None:
    """Run a fire command; bad input ends the process with a one-line message and exit code 2."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        fire.Fire(command, command=argv, serialize=lambda _: None)
    except CodirError as err:
        print(f"codir-ds: error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)


def main() -> None:
    run_command({"pretrain": pretrain, "export": export, "demo": demo})
