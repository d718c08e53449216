"""A training stage as a class, and the one set-up both stages share:
distributed init -> lock -> plan -> the stage's data and DeepSpeed config -> resume plan -> engines -> train -> export.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import deepspeed
import torch

from .loop import TrainResult, train
from .models.ds_config import chosen_ds_config
from .models.loading import ModelPlan, load_tokenizer, plan_models
from .runs.export import export_student
from .runs.monitor import Monitor
from .runs.run_folder import first_start_setting, hold_run_folder, open_checkpoints, run_identity
from .runs.universal import universal_ds_config
from .runtime import files
from .runtime.distributed import barrier, init_distributed, rank, world_size
from .runtime.seeding import seed_everything


class Stage(ABC):
    """One stage of distillation. `__init__` reads the stage's data and works out its DeepSpeed config (`ds_config`);
    `build` makes the engines; `train` then calls `micro_step` and the hooks below; `export_to` names the export.
    `history` holds the logged values by step and `stopped` whether a stop request ended the run early."""

    elastic = False  # resumes on another world size (its checkpoint state is the same on every rank)
    student: deepspeed.DeepSpeedEngine
    teacher: torch.nn.Module | None = None  # a frozen module, or a ZeRO-3 inference engine
    tokens_per_sample: int
    ds_config: dict

    def __init__(self, cfg, plan: ModelPlan):
        self.cfg, self.plan = cfg, plan
        self.tokenizer = load_tokenizer(cfg.teacher.path, "teacher.path")
        self.history: list[dict[str, float]] = []
        self.stopped = False

    @abstractmethod
    def identity(self) -> dict[str, Any]:
        """What this stage adds to the run's identity beside its config (e.g. the corpus digest)."""

    @abstractmethod
    def build(self, ds_config: dict) -> None:
        """Build the teacher, the student engine (`self.student`) and the negatives."""

    @abstractmethod
    def summary(self) -> str:
        """One line on what is trained, printed at start."""

    @abstractmethod
    def micro_step(self) -> dict[str, torch.Tensor]:
        """One forward/backward/step on this rank's next micro-batch: its loss terms and statistics, detached."""

    @abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """What this rank's checkpoint file carries beside DeepSpeed's state."""

    @abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Inverse of `state_dict`."""

    def compile(self) -> None:
        """`train.compile`: compile the student engine and the teacher (a module or an engine) in place."""
        self.student.compile()
        if self.teacher is not None:
            self.teacher.compile()

    def scalars(self) -> dict[str, float]:
        """Scalars beside the loss terms on logging steps (lr, queue fill, ...)."""
        return {"lr": self.student.get_lr()[0]}

    def after_step(self, step: int, monitor: Monitor) -> None:
        """Called after every optimizer step (stage 2 evaluates here)."""
        return None

    def finish(self, result: TrainResult) -> None:
        """Keep what training left: the logged history and whether it stopped early."""
        self.history, self.stopped = result.history, result.stopped

    def export_to(self) -> tuple[Path, str | None, str]:
        """Where the finished run exports its student, from which checkpoint tag (None: latest), and how to say it."""
        return self.cfg.export_dir, None, "student"

    def export_files(self) -> dict[str, str]:
        """Extra files (name -> text) written into the export beside the model."""
        return {}


def run_stage(stage_class: type[Stage], cfg, stop_after: int | None = None) -> Stage:
    """Set up and train one stage to `cfg.train.max_steps` (or stop, checkpointed, after `stop_after` steps), then
    export. The run holds its output folder's lock throughout."""
    init_distributed(cfg.train.comm_timeout_minutes)
    chosen = chosen_ds_config(cfg.train, world_size(), first_start_setting(cfg, "train", "deepspeed_config"))
    cfg = dataclasses.replace(cfg, train=chosen)
    with hold_run_folder(Path(cfg.output.dir)):
        seed_everything(cfg.train.seed)
        plan = plan_models(cfg)  # configs and file headers only: bad input fails before any weights load
        stage = stage_class(cfg, plan)
        cfg = stage.cfg  # completed by the stage (e.g. stage 2's step count from its epochs)
        resume = open_checkpoints(cfg, run_identity(cfg, stage.ds_config, {"layer_map": plan.layer_map, **stage.identity()}), stage.elastic)
        stage.build(universal_ds_config(stage.ds_config) if resume and resume.universal_tag else stage.ds_config)
        if cfg.train.compile:
            stage.compile()
        result = train(cfg, stage, resume, stop_after)
        stage.finish(result)
        if cfg.output.export and result.done == cfg.train.max_steps:
            _export(stage)
    return stage


def _export(stage: Stage) -> None:
    """Rank 0 writes the export; every rank waits for it."""
    out, tag, what = stage.export_to()
    if rank() == 0:
        export_student(stage.cfg.checkpoint_dir, out, tag=tag, overwrite=True)
        for name, text in stage.export_files().items():
            files.write_text(out / name, text)
        print(f"codir-ds: exported {what} to {out}", flush=True)
    barrier()
