"""Stage-1 run configuration: the shared sections plus the masked-LM loss weights and the corpus."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from ..runtime.config import (
    CheckpointConfig,
    CodirConfig,
    LoggingConfig,
    OutputConfig,
    RunPaths,
    StudentConfig,
    TeacherConfig,
    TrainConfig,
    at_least,
    positive,
    validate_codir,
    validate_models,
    validate_run,
)
from ..runtime.errors import CodirError


@dataclass
class LossConfig:
    """L = mlm * L_mlm + kd * T^2 KL(teacher || student at masked positions) + codir * L_codir."""

    mlm: float = 1.0  # weight of the student's masked-LM loss
    kd: float = 0.5  # weight of logit KD at masked positions; set to 0 (with a notice) when the teacher has no MLM head
    kd_temperature: float = 2.0  # T of the logit KD
    codir: float = 1.0  # weight of the contrastive loss on intermediate representations


@dataclass
class DataConfig:
    """One of `prepared`, `files` or `dataset`; the latter two are prepared into <output.dir>/prepared at first start."""

    RENAMED: ClassVar[dict[str, str]] = {"streaming": "removed: prepare large corpora once with `codir-ds prepare` and set data.prepared"}
    prepared: str = ""  # a folder written by `codir-ds prepare` (the way for large corpora)
    files: list[str] = field(default_factory=list)  # local .txt/.jsonl/.json/.parquet/.csv files (compressed or not, globs allowed)
    dataset: str = ""  # a `datasets` hub name instead of files (needs a network)
    dataset_config: str = ""  # the hub dataset's configuration name
    split: str = "train"  # the hub dataset's split
    text_column: str = "text"  # column holding the documents (json/jsonl/parquet/csv)
    prepare_processes: int = 1  # tokenizer processes when `files`/`dataset` are prepared at start
    max_seq_length: int = 128  # tokens per sample, [CLS] and [SEP] included
    mlm_probability: float = 0.15  # share of tokens selected for masked-LM prediction
    num_workers: int = 2  # loader worker processes per rank (0: load in the training process)
    eval_blocks: int = 256  # blocks held out of the corpus for evaluation (at most a tenth of it; 0 = none)
    eval_prepared: str = ""  # a prepared folder to evaluate on instead (then the training corpus keeps every block)


@dataclass
class EvalConfig:
    """Held-out evaluation: masked-LM loss, KD, CoDIR top-1 and loss, per-layer cosine (see `evaluation.py`)."""

    every: int = 500  # steps between held-out evaluations; 0 = only at the end of training
    batch_size: int = 32  # held-out blocks per forward pass per rank


@dataclass
class PretrainConfig(RunPaths):
    """Stage 1: CoDIR pre-training distillation."""

    teacher: TeacherConfig = field(default_factory=TeacherConfig)  # the frozen model to distil
    student: StudentConfig = field(default_factory=StudentConfig)  # the smaller model to train
    codir: CodirConfig = field(default_factory=CodirConfig)  # contrastive loss on intermediate representations
    loss: LossConfig = field(default_factory=LossConfig)  # weights of the three losses
    data: DataConfig = field(default_factory=DataConfig)  # the corpus and masking
    train: TrainConfig = field(default_factory=TrainConfig)  # optimisation and run length
    eval: EvalConfig = field(default_factory=EvalConfig)  # held-out evaluation
    logging: LoggingConfig = field(default_factory=LoggingConfig)  # log lines and TensorBoard
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)  # checkpoints, resuming and graceful stops
    output: OutputConfig = field(default_factory=OutputConfig)  # run folder and export

    def validate(self) -> None:
        """Reject impossible values that need no model to detect."""
        validate_models(self.teacher, self.student)
        validate_codir(self.codir)
        for name in ("mlm", "kd", "codir"):
            at_least(getattr(self.loss, name), 0, f"loss.{name}")
        positive(self.loss.kd_temperature, "loss.kd_temperature")
        given = [key for key in ("prepared", "files", "dataset") if getattr(self.data, key)]
        if len(given) != 1:
            raise CodirError(
                "data: give exactly one of data.prepared (a `codir-ds prepare` folder), data.files or data.dataset"
                + (f"; got {' and '.join('data.' + key for key in given)}" if given else "")
            )
        at_least(self.data.prepare_processes, 1, "data.prepare_processes")
        at_least(self.data.num_workers, 0, "data.num_workers")
        at_least(self.data.max_seq_length, 8, "data.max_seq_length")
        at_least(self.data.eval_blocks, 0, "data.eval_blocks")
        at_least(self.eval.every, 0, "eval.every")
        at_least(self.eval.batch_size, 1, "eval.batch_size")
        if not 0 < self.data.mlm_probability < 1:
            raise CodirError(f"data.mlm_probability: {self.data.mlm_probability} is not in (0, 1)")
        at_least(self.train.max_steps, 1, "train.max_steps")
        validate_run(self.train, self.logging, self.checkpoint)
