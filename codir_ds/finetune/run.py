"""Stage 2: task finetuning distillation on DeepSpeed.

config -> task data -> frozen task teacher (ZeRO-3) -> memory bank of its features and logits over the
training set (or a live teacher and the stage-1 queue) -> student loss (1 - a) CE + a T^2 KL + b CoDIR
with label-aware negatives -> dev evaluation, best checkpoint -> export.

The same loop finetunes the teacher itself (`teacher_training_config`): alpha = beta = 0, no teacher.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import json
import math
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForSequenceClassification, PretrainedConfig

from ..method.losses import INTERMEDIATE_LOSSES
from ..method.memory_bank import MemoryBank, fill_memory_bank
from ..method.objective import run_objective
from ..models.ds_config import load_ds_config
from ..models.encoders import check_length
from ..models.engines import frozen_teacher, parameter_counts, student_engine
from ..models.loading import ModelPlan, build_student, has_classifier_head
from ..runs.checkpoint import save_checkpoint
from ..runs.monitor import Monitor
from ..runtime.distributed import all_gather_rows, barrier, device, print0, rank, world_size
from ..runtime.errors import CodirError
from ..stage import Stage, run_stage
from .config import FinetuneConfig, FinetuneStudentConfig, TaskLossConfig
from .data import EpochBatches, Task, TaskData, collate, load_task_data, padded_shards, resolve_task
from .metrics import compute_metrics
from .modules import ClassifierWithHeads, TaskLossWeights, TeacherTaskOutputs

BEST = "best"  # checkpoint tag of the best dev score; pruning never removes it
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def teacher_training_config(cfg: FinetuneConfig) -> FinetuneConfig:
    """The config that finetunes the teacher itself on the task: CE only, starting from `teacher.path`; its
    checkpoints and logs go to `<output.dir>/teacher_run/`, apart from the distillation's."""
    student = FinetuneStudentConfig(init="checkpoint", checkpoint=cfg.teacher.path)
    run = Path(cfg.output.dir) / "teacher_run"
    checkpoint = dataclasses.replace(cfg.checkpoint, dir=cfg.checkpoint.dir or str(run / "checkpoints"))
    logging = dataclasses.replace(cfg.logging, tensorboard_dir=cfg.logging.tensorboard_dir or str(run / "tensorboard"))
    loss = TaskLossConfig(alpha=0.0, beta=0.0, kd_temperature=cfg.loss.kd_temperature)
    return dataclasses.replace(cfg, student=student, loss=loss, checkpoint=checkpoint, logging=logging)


def run_finetuning(cfg: FinetuneConfig, stop_after: int | None = None, export_name: str = "student") -> FinetuneStage:
    """Train for `train.epochs` (or `train.max_steps`), evaluating on the dev split(s); export the best student
    (as `export_name` beside `output.dir`'s default export)."""
    return run_stage(functools.partial(FinetuneStage, export_name=export_name), cfg, stop_after)


class FinetuneStage(Stage):
    """Stage 2 on this rank: task data, teacher (or its memory bank), the student engine and its CoDIR objective,
    and the evaluations so far."""

    def __init__(self, cfg: FinetuneConfig, plan: ModelPlan, export_name: str = "student"):
        task = resolve_task(cfg.task)
        check_length(plan.layout, cfg.task.max_seq_length, "task.max_seq_length")
        super().__init__(cfg, plan)
        self.data = _load_data_rank0_first(cfg, task, self.tokenizer)
        fit_plan_to_task(cfg, plan, self.task)  # with the labels a custom task's train set declares
        self.batches = EpochBatches(self.data.train, self.tokenizer, cfg.train.micro_batch_size, rank(), world_size(), cfg.train.seed)
        self.steps_per_epoch = max(1, self.batches.per_epoch // cfg.train.gradient_accumulation_steps)
        max_steps = cfg.train.max_steps or max(1, math.ceil(cfg.train.epochs * self.batches.per_epoch / cfg.train.gradient_accumulation_steps))
        self.cfg = cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, max_steps=max_steps))
        self.ds_config = load_ds_config(cfg.train, world_size())
        self.tokens_per_sample = cfg.task.max_seq_length
        self.export_name = export_name
        self.evals: list[dict] = []  # {"step", "metrics"} per evaluation
        self.best: dict = {}  # the best evaluation so far
        self.teacher = self.bank = self.objective = None

    @property
    def task(self) -> Task:
        return self.data.task

    def identity(self) -> dict:
        return {"task.labels": self.task.labels}  # stage 2's data order and negatives are per rank: same world size only

    def build(self, ds_config: dict) -> None:
        cfg, plan = self.cfg, self.plan
        intermediate = INTERMEDIATE_LOSSES[cfg.loss.intermediate] if cfg.distils and cfg.loss.beta > 0 else None
        token_level = intermediate is not None and intermediate.teacher_input == "tokens"
        if cfg.distils:
            wrap = functools.partial(TeacherTaskOutputs, layer_map=plan.layer_map, pooling=cfg.codir.pooling, with_states=token_level)
            self.teacher = frozen_teacher(cfg.teacher.path, AutoModelForSequenceClassification, wrap, ds_config, cfg.teacher.zero3)
        if cfg.distils and cfg.codir.negatives == "bank" and not token_level:
            self.bank = build_memory_bank(self.teacher, self.data, self.tokenizer, cfg)
            if not cfg.teacher.live:
                self.teacher = None  # later steps read the teacher's outputs from the bank
                gc.collect()
        student = build_student(
            cfg.student, cfg.teacher.path, plan.student_config, plan.layer_map, AutoModelForSequenceClassification, ignore_mismatched_sizes=True
        )
        if intermediate is not None and intermediate.compare is None:
            sampler = torch.Generator(device=self.bank.features.device).manual_seed(cfg.train.seed + rank()) if self.bank else None
            self.objective = run_objective(cfg.codir, student.config, plan.teacher_feature_dim, self.bank, sampler)
        weights = TaskLossWeights(cfg.loss.alpha, cfg.loss.kd_temperature, cfg.loss.beta, self.task.regression, cfg.loss.intermediate)
        module = ClassifierWithHeads(student, self.objective, plan.teacher_feature_dim, cfg.codir.pooling, weights)
        self.student = student_engine(module, ds_config, cfg.train.deepspeed_config)

    def summary(self) -> str:
        cfg = self.cfg
        student_total, _ = parameter_counts(self.student.module.student)
        intermediate = cfg.loss.intermediate if cfg.distils and cfg.loss.beta > 0 else "none"
        negatives = f"{intermediate} ({cfg.codir.negatives} negatives)" if intermediate == "codir" else intermediate
        return (
            f"task {self.task.name} ({len(self.data.train)} train, "
            + ", ".join(f"{k} {len(v)}" for k, v in self.data.dev.items())
            + f"), student {student_total / 1e6:.2f}M params, layer map {self.plan.layer_map}, intermediate loss {negatives}, "
            f"{cfg.train.max_steps} steps"
        )

    def micro_step(self) -> dict[str, torch.Tensor]:
        batch = {k: v.to(self.student.device) for k, v in self.batches.next_batch().items()}
        inputs = {k: batch[k] for k in MODEL_INPUTS if k in batch}
        teacher = {}
        if self.teacher is not None:
            with torch.no_grad():
                teacher["teacher_features"], teacher["teacher_logits"], teacher["teacher_states"] = self.teacher(**inputs)
        elif self.bank is not None:
            teacher["teacher_features"], teacher["teacher_logits"] = self.bank.features[batch["idx"]], self.bank.logits[batch["idx"]]
        terms, stats = self.student(**inputs, labels=batch["labels"], ids=batch["idx"], **teacher)
        self.student.backward(terms["total"])
        self.student.step()
        return {**{name: value.detach() for name, value in terms.items()}, **stats}

    def after_step(self, step: int, monitor: Monitor) -> None:
        if step == self.cfg.train.max_steps or step % (self.cfg.eval.every or self.steps_per_epoch) == 0:
            _evaluate_and_keep_best(self, step, monitor)

    def scalars(self) -> dict[str, float]:
        return {**super().scalars(), **(self.objective.scalars() if self.objective is not None else {})}

    def state_dict(self) -> dict:
        negatives = self.objective.negatives_state() if self.objective is not None else {"queue": None, "sampler": None}
        return {"batches": self.batches.state_dict(), **negatives, "best": self.best, "evals": self.evals}

    def load_state_dict(self, state: dict) -> None:
        self.batches.load_state_dict(state["batches"])
        if self.objective is not None:
            self.objective.load_negatives_state(state)
        self.best, self.evals = state["best"], state["evals"]

    def export_to(self) -> tuple[Path, str | None, str]:
        """The best-scoring student (by the first dev split's first metric), beside the default export."""
        best = self.best
        note = f"{self.export_name} (best {best.get('metric')} {best.get('score', float('nan')):.4f} at step {best.get('step')})"
        return self.cfg.export_dir.parent / self.export_name, BEST if best else None, note

    def export_files(self) -> dict[str, str]:
        return {"eval_results.json": json.dumps({"best": self.best, "history": self.evals}, indent=1)}


@torch.no_grad()
def evaluate(run: FinetuneStage) -> dict[str, dict[str, float]]:
    """The task's metrics on every dev split: {split: {metric: value}}. Every rank takes part (ZeRO-3)."""
    run.student.eval()
    results = {}
    for name, split in run.data.dev.items():
        logits, ids = [], []
        for indices, real in padded_shards(len(split), rank(), world_size(), run.cfg.eval.batch_size):
            batch = collate(split, indices, run.batches.tokenizer)
            out = run.student.module.predict(**{k: batch[k].to(run.student.device) for k in MODEL_INPUTS if k in batch})
            logits.append(all_gather_rows(out[:real].float())[0])
            ids.append(all_gather_rows(batch["idx"][:real].to(run.student.device))[0])
        order = torch.argsort(torch.cat(ids))
        outputs = torch.cat(logits)[order].cpu().numpy()
        results[name] = compute_metrics(list(run.task.metrics), outputs, np.asarray(split["label"]), run.task.regression)
    run.student.train()
    return results


def fit_plan_to_task(cfg: FinetuneConfig, plan: ModelPlan, task: Task) -> None:
    """Check the teacher against the task and give the student the task's labels."""
    if cfg.distils:
        if not has_classifier_head(cfg.teacher.path):
            raise CodirError(
                f"teacher.path: {cfg.teacher.path} has no classification head: finetune it on the task first "
                f"(deepspeed launch/finetune.py teacher --config ...)"
            )
        if plan.teacher_config.num_labels != task.num_labels:
            raise CodirError(f"teacher.path: the teacher predicts {plan.teacher_config.num_labels} labels, task {task.name} has {task.num_labels}")
    _configure_for_task(plan.student_config, task)


def _configure_for_task(config: PretrainedConfig, task: Task) -> None:
    config.num_labels = task.num_labels
    config.problem_type = "regression" if task.regression else "single_label_classification"
    if task.labels:
        config.id2label = dict(enumerate(task.labels))
        config.label2id = {label: i for i, label in enumerate(task.labels)}


def build_memory_bank(teacher, data: TaskData, tokenizer, cfg: FinetuneConfig) -> MemoryBank:
    """One teacher pass over the training set; every rank computes its share and receives the whole bank."""

    def forward(batch):
        features, logits, _ = teacher(**{k: batch[k].to(device()) for k in MODEL_INPUTS if k in batch})
        return features, logits

    shards = (
        (collate(data.train, indices, tokenizer), real) for indices, real in padded_shards(len(data.train), rank(), world_size(), cfg.eval.batch_size)
    )
    features, logits = fill_memory_bank(forward, shards, len(data.train), lambda rows: all_gather_rows(rows)[0])
    labels = torch.tensor(data.train["label"])
    bank = MemoryBank(features, logits, labels, data.task.regression)
    print0(f"codir-ds: memory bank of {len(bank)} teacher features x {features.shape[1]} and logits ({bank.nbytes / 2**20:.1f} MiB per rank)")
    return bank


def _load_data_rank0_first(cfg: FinetuneConfig, task: Task, tokenizer) -> TaskData:
    """Rank 0 reads and tokenises first (bad data fails once, early); the other ranks reuse its cache."""

    def load() -> TaskData:
        return load_task_data(
            task, tokenizer, cfg.task.max_seq_length, cfg.task.max_train_examples, cfg.task.max_eval_examples, cfg.task.drop_unlabelled
        )

    data = load() if rank() == 0 else None
    barrier()
    return data if data is not None else load()


def _evaluate_and_keep_best(run: FinetuneStage, step: int, monitor: Monitor) -> None:
    results = evaluate(run)
    run.evals.append({"step": step, "metrics": results})
    monitor.scalars(step, {f"eval/{split}/{metric}": value for split, values in results.items() for metric, value in values.items()})
    first_split, primary = next(iter(results)), run.task.metrics[0]
    score = results[first_split][primary]
    print0(
        f"codir-ds: step {step}: "
        + ", ".join(f"{split} {metric} {value:.4f}" for split, values in results.items() for metric, value in values.items())
    )
    if not run.best or score > run.best["score"]:
        run.best = {"step": step, "score": score, "metric": f"{first_split}/{primary}", "metrics": results}
        save_checkpoint(run.student, run.cfg.checkpoint_dir, step, run.state_dict(), run.cfg.checkpoint.keep, tag=BEST)
