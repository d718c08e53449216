"""Stage-2 run configuration: the task, the finetuned teacher, negatives, the task loss and evaluation."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

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
from .metrics import METRICS


@dataclass
class TaskConfig:
    name: str = "custom"  # a GLUE task (mnli qqp qnli sst2 cola stsb mrpc rte) or "custom"
    data_dir: str = ""  # GLUE task: folder of its TSV files as GLUE distributes them (train.tsv, dev.tsv, ...)
    hub: bool = False  # GLUE task: load `glue/<name>` with `datasets` instead (needs a network)
    train_file: str = ""  # a CSV/TSV/JSON(L) training file; overrides data_dir's, required for custom tasks
    dev_files: list[str] = field(default_factory=list)  # evaluation files; default: the task's dev split(s)
    text_columns: list[str] = field(default_factory=list)  # one or two text columns; default: the task's
    label_column: str = ""  # default: the task's ("label" for custom tasks)
    labels: list[str] = field(default_factory=list)  # custom: label values in id order; default: the train set's, sorted
    regression: bool = False  # custom: a real-valued label (MSE instead of CE and KL)
    metrics: list[str] = field(default_factory=list)  # default: the task's (custom: accuracy, or pearson/spearman)
    max_seq_length: int = 128  # tokens per example, longer ones truncated
    max_train_examples: int = 0  # 0 = all; otherwise the first N (quick runs)
    max_eval_examples: int = 0  # 0 = all; otherwise the first N of each dev file
    drop_unlabelled: bool = False  # drop examples whose label cell is empty or NaN (a printed count) instead of stopping


@dataclass
class FinetuneTeacherConfig(TeacherConfig):
    live: bool = False  # with codir.negatives=bank: run the teacher every step instead of reading its cached outputs


@dataclass
class FinetuneStudentConfig(StudentConfig):
    init: Literal["teacher_layers", "config", "checkpoint"] = "checkpoint"  # stage 2 starts from the stage-1 export


@dataclass
class FinetuneCodirConfig(CodirConfig):
    negatives: Literal["bank", "queue"] = "bank"  # bank: teacher features of the whole train set; queue: stage-1 FIFO
    num_negatives: int = 100  # bank: K negatives per anchor, of a different label (random for regression)
    objective: Literal["infonce", "crd_nce"] = "infonce"  # crd_nce: the authors' CRD binary NCE against a momentum memory (bank only)
    momentum: float = 0.5  # crd_nce: weight of a memory row's old value when its example is seen again


@dataclass
class TaskLossConfig:
    """L = (1 - alpha) * CE + alpha * T^2 * KL + beta * intermediate."""

    RENAMED: ClassVar[dict[str, str]] = {"kd": "renamed loss.alpha (the KD mix)", "codir": "renamed loss.beta (the intermediate-loss weight)"}
    alpha: float = 0.5  # mixes logit KD into CE: (1 - alpha) * CE + alpha * T^2 * KL
    kd_temperature: float = 2.0  # T of the logit KD
    beta: float = 0.03  # weight of the intermediate-layer loss below; 0.03: the authors' CoDIR weight at batch 32 (docs/method.md)
    intermediate: Literal["codir", "mse", "mse_tokens", "cosine"] = "codir"  # baselines: PKD pooled MSE, token MSE, cosine


@dataclass
class FinetuneTrainConfig(TrainConfig):
    micro_batch_size: int = 32  # samples per rank per forward pass
    lr: float = 5e-5  # peak learning rate
    epochs: float = 3.0  # passes over the training set (fractions allowed)
    max_steps: int = 0  # 0 = as many steps as `epochs` takes


@dataclass
class EvalConfig:
    every: int = 0  # steps between dev evaluations; 0 = at the end of each epoch (and always at the end)
    batch_size: int = 64  # evaluation batch size per rank


@dataclass
class FinetuneConfig(RunPaths):
    """Stage 2: task finetuning distillation (CE + logit KD + CoDIR with label-aware negatives)."""

    task: TaskConfig = field(default_factory=TaskConfig)  # the task and its data
    teacher: FinetuneTeacherConfig = field(default_factory=FinetuneTeacherConfig)  # the teacher, finetuned on the task (the `teacher` command)
    student: FinetuneStudentConfig = field(default_factory=FinetuneStudentConfig)  # the student, by default the stage-1 export
    codir: FinetuneCodirConfig = field(default_factory=FinetuneCodirConfig)  # contrastive loss on intermediate representations
    loss: TaskLossConfig = field(default_factory=TaskLossConfig)  # task loss, logit KD and intermediate-loss weights
    train: FinetuneTrainConfig = field(default_factory=FinetuneTrainConfig)  # optimisation and run length
    eval: EvalConfig = field(default_factory=EvalConfig)  # dev-set evaluation
    logging: LoggingConfig = field(default_factory=LoggingConfig)  # log lines and TensorBoard
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)  # checkpoints, resuming and graceful stops
    output: OutputConfig = field(default_factory=lambda: OutputConfig(dir="runs/finetune"))  # run folder and export

    def validate(self) -> None:
        validate_models(self.teacher, self.student)
        validate_codir(self.codir)
        at_least(self.codir.num_negatives, 1, "codir.num_negatives")
        if self.codir.objective == "crd_nce" and self.codir.negatives != "bank":
            raise CodirError("codir.objective: crd_nce scores rows of a memory over the training set; it needs codir.negatives=bank")
        if not 0 <= self.codir.momentum < 1:
            raise CodirError(f"codir.momentum: {self.codir.momentum} is not in [0, 1)")
        if not 0 <= self.loss.alpha <= 1:
            raise CodirError(f"loss.alpha: {self.loss.alpha} is not in [0, 1] (it weighs KD against CE)")
        at_least(self.loss.beta, 0, "loss.beta")
        positive(self.loss.kd_temperature, "loss.kd_temperature")
        if self.task.text_columns and not 1 <= len(self.task.text_columns) <= 2:
            raise CodirError(f"task.text_columns: {self.task.text_columns} must name one or two columns")
        for metric in self.task.metrics:
            if metric not in METRICS:
                raise CodirError(f"task.metrics: unknown metric {metric!r}; choose from {', '.join(METRICS)}")
        at_least(self.task.max_seq_length, 8, "task.max_seq_length")
        at_least(self.task.max_train_examples, 0, "task.max_train_examples")
        at_least(self.task.max_eval_examples, 0, "task.max_eval_examples")
        positive(self.train.epochs, "train.epochs")
        at_least(self.train.max_steps, 0, "train.max_steps")
        at_least(self.eval.every, 0, "eval.every")
        at_least(self.eval.batch_size, 1, "eval.batch_size")
        validate_run(self.train, self.logging, self.checkpoint)

    @property
    def distils(self) -> bool:
        """Whether the run needs the teacher at all (not for plain finetuning: alpha = beta = 0)."""
        return self.loss.alpha > 0 or self.loss.beta > 0
