"""Stage-1 run configuration: the shared sections plus the masked-LM loss weights and the corpus."""
from __future__ import annotations

from dataclasses import dataclass, field

from ..config import (
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
from ..errors import CodirError


@dataclass
class LossConfig:
    mlm: float = 1.0  # weight of the student's masked-LM loss
    kd: float = 0.5  # alpha: KD on MLM logits; set to 0 (with a notice) when the teacher has no MLM head
    kd_temperature: float = 2.0
    codir: float = 1.0  # beta: contrastive loss on intermediate representations


@dataclass
class DataConfig:
    files: list[str] = field(default_factory=list)  # local text/json/jsonl/parquet files
    dataset: str = ""  # a `datasets` hub name instead of files (needs a network)
    dataset_config: str = ""
    split: str = "train"
    text_column: str = "text"
    streaming: bool = False  # read lazily: for corpora larger than memory
    max_seq_length: int = 128
    mlm_probability: float = 0.15


@dataclass
class PretrainConfig(RunPaths):
    """Stage 1: CoDIR pre-training distillation."""

    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    codir: CodirConfig = field(default_factory=CodirConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def validate(self) -> None:
        """Reject impossible values that need no model to detect."""
        validate_models(self.teacher, self.student)
        validate_codir(self.codir)
        for name in ("mlm", "kd", "codir"):
            at_least(getattr(self.loss, name), 0, f"loss.{name}")
        positive(self.loss.kd_temperature, "loss.kd_temperature")
        if not self.data.files and not self.data.dataset:
            raise CodirError("data.files: give local corpus files (or data.dataset, a hub name)")
        at_least(self.data.max_seq_length, 8, "data.max_seq_length")
        if not 0 < self.data.mlm_probability < 1:
            raise CodirError(f"data.mlm_probability: {self.data.mlm_probability} is not in (0, 1)")
        at_least(self.train.max_steps, 1, "train.max_steps")
        validate_run(self.train, self.logging, self.checkpoint)
