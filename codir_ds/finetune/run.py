"""Stage 2: task finetuning distillation on DeepSpeed.

config -> task data -> frozen task teacher (ZeRO-3) -> memory bank of its features and logits over the
training set (or a live teacher and the stage-1 queue) -> student loss (1 - a) CE + a T^2 KL + b CoDIR
with label-aware negatives -> dev evaluation, best checkpoint -> export.

The same loop finetunes the teacher itself (`teacher_training_config`): alpha = beta = 0, no teacher.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import deepspeed
import numpy as np
import torch
from transformers import AutoModelForSequenceClassification, PretrainedConfig

from .. import files
from ..checkpoint import save_checkpoint, seed_everything
from ..distributed import (
    all_gather_rows,
    barrier,
    init_distributed,
    print0,
    rank,
    world_size,
)
from ..ds_config import load_ds_config
from ..encoders import check_length
from ..engines import parameter_counts, student_engine, teacher_engine
from ..errors import CodirError
from ..export import export_student
from ..loop import Stage, train
from ..losses import INTERMEDIATE_LOSSES, contrastive_stats
from ..models import (
    ModelPlan,
    build_student,
    has_classifier_head,
    load_teacher,
    load_tokenizer,
    plan_models,
)
from ..monitor import Monitor
from ..negatives import NegativeQueue
from ..run_folder import hold_run_folder, open_checkpoints, run_identity
from .config import FinetuneConfig, FinetuneStudentConfig, TaskLossConfig
from .data import (
    EpochBatches,
    Task,
    TaskData,
    collate,
    load_task_data,
    padded_shards,
    resolve_task,
)
from .memory_bank import MemoryBank, fill_memory_bank
from .metrics import compute_metrics
from .modules import (
    ClassifierWithHeads,
    TaskLossWeights,
    TeacherTaskOutputs,
)

BEST = "best"  # checkpoint tag of the best dev score; pruning never removes it
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


@dataclass
class FinetuneRun:
    """Engines, negatives, data and history of one run on this rank."""

    cfg: FinetuneConfig
    data: TaskData
    student: deepspeed.DeepSpeedEngine
    teacher: deepspeed.DeepSpeedEngine | None  # None when not needed (cached bank, or plain finetuning)
    bank: MemoryBank | None
    queue: NegativeQueue | None
    batches: EpochBatches
    sampler: torch.Generator  # draws the bank's negatives; part of the checkpoint
    losses: list[dict[str, float]] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)  # {"step", "metrics"} per evaluation
    best: dict = field(default_factory=dict)  # the best evaluation so far
    stopped: bool = False  # stopped on request before train.max_steps

    @property
    def task(self) -> Task:
        return self.data.task


def teacher_training_config(cfg: FinetuneConfig) -> FinetuneConfig:
    """The config that finetunes the teacher itself on the task: CE only, starting from `teacher.path`; its
    checkpoints and logs go to `<output.dir>/teacher_run/`, apart from the distillation's."""
    student = FinetuneStudentConfig(init="checkpoint", checkpoint=cfg.teacher.path)
    run = Path(cfg.output.dir) / "teacher_run"
    checkpoint = dataclasses.replace(cfg.checkpoint, dir=cfg.checkpoint.dir or str(run / "checkpoints"))
    logging = dataclasses.replace(cfg.logging, tensorboard_dir=cfg.logging.tensorboard_dir or str(run / "tensorboard"))
    loss = TaskLossConfig(alpha=0.0, beta=0.0, kd_temperature=cfg.loss.kd_temperature)
    return dataclasses.replace(cfg, student=student, loss=loss, checkpoint=checkpoint, logging=logging)


def run_finetuning(cfg: FinetuneConfig, stop_after: int | None = None, export_name: str = "student") -> FinetuneRun:
    """Train for `train.epochs` (or `train.max_steps`), evaluating on the dev split(s); export the best student.
    The run holds its output folder's lock throughout."""
    init_distributed(cfg.train.comm_timeout_minutes)
    with hold_run_folder(Path(cfg.output.dir)):
        return _finetune(cfg, stop_after, export_name)


def _finetune(cfg: FinetuneConfig, stop_after: int | None, export_name: str) -> FinetuneRun:
    seed_everything(cfg.train.seed)
    task = resolve_task(cfg.task)
    plan = plan_models(cfg)  # configs and file headers only: bad paths fail before any data is read
    check_length(plan.layout, cfg.task.max_seq_length, "task.max_seq_length")
    tokenizer = load_tokenizer(cfg.teacher.path, "teacher.path")
    data = _load_data_rank0_first(cfg, task, tokenizer)
    task = data.task  # with the labels a custom task's train set declares
    fit_plan_to_task(cfg, plan, task)
    batches = EpochBatches(data.train, tokenizer, cfg.train.micro_batch_size, rank(), world_size(), cfg.train.seed)
    train_cfg = dataclasses.replace(
        cfg.train, max_steps=cfg.train.max_steps or max(1, math.ceil(cfg.train.epochs * batches.per_epoch / cfg.train.gradient_accumulation_steps))
    )
    cfg = dataclasses.replace(cfg, train=train_cfg)
    ds_config = load_ds_config(cfg.train, world_size())
    # stage 2's data order and negative sampler are per rank: same world size only, checked before any work
    resume = open_checkpoints(cfg, run_identity(cfg, ds_config, {"layer_map": plan.layer_map, "task.labels": task.labels}), elastic=False)

    token_level = cfg.loss.beta > 0 and INTERMEDIATE_LOSSES[cfg.loss.intermediate].teacher_input == "tokens"
    teacher = build_task_teacher(cfg, plan, ds_config, with_states=token_level) if cfg.distils else None
    bank = queue = None
    if cfg.distils and cfg.codir.negatives == "bank" and not token_level:
        bank = build_memory_bank(teacher, data, tokenizer, cfg)
        if not cfg.teacher.live:
            teacher = None  # later steps read the teacher's outputs from the bank
            gc.collect()
    student = build_task_student(cfg, plan, ds_config, task)
    if cfg.distils and cfg.codir.negatives == "queue" and cfg.loss.intermediate == "codir":
        queue = NegativeQueue(cfg.codir.queue_length, plan.teacher_feature_dim, device=student.device)
    sampler = torch.Generator().manual_seed(cfg.train.seed + rank())
    run = FinetuneRun(cfg, data, student, teacher, bank, queue, batches, sampler)

    steps_per_epoch = max(1, batches.per_epoch // cfg.train.gradient_accumulation_steps)
    result = train(cfg, student, _stage(run, plan, steps_per_epoch), tokenizer, resume, stop_after)
    run.losses, run.stopped = result.history, result.stopped
    if cfg.output.export and result.done == cfg.train.max_steps:
        _export(run, export_name)
    return run


def _stage(run: FinetuneRun, plan: ModelPlan, steps_per_epoch: int) -> Stage:
    cfg = run.cfg
    student_total, _ = parameter_counts(run.student.module.student)
    intermediate = cfg.loss.intermediate if cfg.distils and cfg.loss.beta > 0 else "none"
    negatives = f"{intermediate} ({cfg.codir.negatives} negatives)" if intermediate == "codir" else intermediate
    summary = (
        f"task {run.task.name} ({len(run.data.train)} train, "
        + ", ".join(f"{k} {len(v)}" for k, v in run.data.dev.items())
        + f"), student {student_total / 1e6:.2f}M params, layer map {plan.layer_map}, intermediate loss {negatives}, "
        f"{cfg.train.max_steps} steps"
    )

    def after_step(step: int, monitor: Monitor) -> None:
        if step == cfg.train.max_steps or step % (cfg.eval.every or steps_per_epoch) == 0:
            _evaluate_and_keep_best(run, step, monitor)

    return Stage(
        micro_step=lambda: micro_step(run),
        rank_state=lambda: _rank_state(run),
        restore=lambda state: _restore(run, state),
        scalars=lambda: _scalars(run),
        tokens_per_sample=cfg.task.max_seq_length,
        summary=summary,
        after_step=after_step,
    )


def micro_step(run: FinetuneRun) -> dict[str, torch.Tensor]:
    """One forward/backward/step on this rank's next micro-batch; its loss terms and CoDIR statistics, detached."""
    cfg, device = run.cfg, run.student.device
    batch = {k: v.to(device) for k, v in run.batches.next_batch().items()}
    inputs = {k: batch[k] for k in MODEL_INPUTS if k in batch}
    labels, idx = batch["labels"], batch["idx"]
    teacher_logits, target, enqueue = None, None, None
    if cfg.distils:
        if run.teacher is not None:
            with torch.no_grad():
                features, teacher_logits, states = run.teacher(**inputs)
        else:
            features, teacher_logits, states = run.bank.features[idx], run.bank.logits[idx], None
        intermediate = INTERMEDIATE_LOSSES[cfg.loss.intermediate] if cfg.loss.beta > 0 else None
        if intermediate is None:
            pass
        elif intermediate.teacher_input == "tokens":
            target = {"states": states}
        elif intermediate.compare is not None:
            target = {"positives": features}
        elif run.bank is not None:
            target = _bank_negatives(run, features, idx, labels)
        else:
            target, enqueue = _queue_candidates(run, features, labels, idx)
    terms, contrast = run.student(**inputs, labels=labels, teacher_logits=teacher_logits, target=target)
    run.student.backward(terms["total"])
    run.student.step()
    if enqueue is not None:
        run.queue.enqueue(*enqueue)
    stats = contrastive_stats(*contrast, cfg.codir.temperature) if contrast else {}
    return {**{name: value.detach() for name, value in terms.items()}, **stats}


def _bank_negatives(run: FinetuneRun, features, idx, labels) -> dict:
    """K negatives per anchor from the memory bank, of a different label (random for regression)."""
    rows = run.bank.sample_negatives(idx, labels, run.cfg.codir.num_negatives, run.sampler)
    return {"positives": features, "negatives": run.bank.features[rows.to(run.bank.features.device)]}


def _queue_candidates(run: FinetuneRun, features, labels, idx) -> tuple[dict, tuple]:
    """Candidates: the all-gathered global batch, then the queue (same-label rows masked for classification, the
    anchor's own example always); and the rows to enqueue after the step."""
    batch_features, offset = all_gather_rows(features)
    batch_ids, _ = all_gather_rows(idx)
    queued_features, queued_labels, queued_ids = run.queue.valid()
    contrast = {
        "candidates": torch.cat([batch_features.to(queued_features.dtype), queued_features]),
        "positive_index": offset + torch.arange(len(features), device=features.device),
        "anchor_ids": idx,
        "candidate_ids": torch.cat([batch_ids, queued_ids]),
    }
    if run.task.regression:
        return contrast, (batch_features, None, batch_ids)
    batch_labels, _ = all_gather_rows(labels)
    contrast["candidate_labels"] = torch.cat([batch_labels, queued_labels])
    return contrast, (batch_features, batch_labels, batch_ids)


@torch.no_grad()
def evaluate(run: FinetuneRun) -> dict[str, dict[str, float]]:
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


def build_task_teacher(cfg: FinetuneConfig, plan: ModelPlan, ds_config: dict, with_states: bool = False):
    """The frozen task teacher (features of its mapped layers, logits, optionally token states), ZeRO-3
    partitioned with `teacher.zero3`."""
    return teacher_engine(
        lambda: load_teacher(cfg.teacher.path, AutoModelForSequenceClassification),
        lambda model: TeacherTaskOutputs(model, plan.layer_map, cfg.codir.pooling, with_states),
        ds_config,
        cfg.teacher.zero3,
    )


def build_memory_bank(teacher, data: TaskData, tokenizer, cfg: FinetuneConfig) -> MemoryBank:
    """One teacher pass over the training set; every rank computes its share and receives the whole bank."""
    device = teacher.device

    def forward(batch):
        features, logits, _ = teacher(**{k: batch[k].to(device) for k in MODEL_INPUTS if k in batch})
        return features, logits

    shards = (
        (collate(data.train, indices, tokenizer), real) for indices, real in padded_shards(len(data.train), rank(), world_size(), cfg.eval.batch_size)
    )
    features, logits = fill_memory_bank(forward, shards, len(data.train), lambda rows: all_gather_rows(rows)[0])
    labels = torch.tensor(data.train["label"])
    bank = MemoryBank(features, logits, labels, data.task.regression)
    print0(f"codir-ds: memory bank of {len(bank)} teacher features x {features.shape[1]} and logits ({bank.nbytes / 2**20:.1f} MiB per rank)")
    return bank


def build_task_student(cfg: FinetuneConfig, plan: ModelPlan, ds_config: dict, task: Task):
    student = build_student(
        cfg.student, cfg.teacher.path, plan.student_config, plan.layer_map, AutoModelForSequenceClassification, ignore_mismatched_sizes=True
    )
    weights = TaskLossWeights(cfg.loss.alpha, cfg.loss.kd_temperature, cfg.loss.beta, cfg.codir.temperature, task.regression, cfg.loss.intermediate)
    module = ClassifierWithHeads(student, plan.teacher_feature_dim, cfg.codir.projection_dim, cfg.codir.pooling, weights)
    return student_engine(module, ds_config, cfg.train.deepspeed_config)


def _load_data_rank0_first(cfg: FinetuneConfig, task: Task, tokenizer) -> TaskData:
    """Rank 0 reads and tokenises first (bad data fails once, early); the other ranks reuse its cache."""

    def load() -> TaskData:
        return load_task_data(
            task, tokenizer, cfg.task.max_seq_length, cfg.task.max_train_examples, cfg.task.max_eval_examples, cfg.task.drop_unlabelled
        )

    data = load() if rank() == 0 else None
    barrier()
    return data if data is not None else load()


def _evaluate_and_keep_best(run: FinetuneRun, step: int, monitor: Monitor) -> None:
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
        save_checkpoint(run.student, run.cfg.checkpoint_dir, step, _rank_state(run), run.cfg.checkpoint.keep, tag=BEST)


def _scalars(run: FinetuneRun) -> dict[str, float]:
    """Scalars beside the loss terms, on logging steps."""
    return {"lr": run.student.get_lr()[0], **({"codir/queue_fill": run.queue.fill_fraction} if run.queue is not None else {})}


def _rank_state(run: FinetuneRun) -> dict:
    return {
        "batches": run.batches.state_dict(),
        "queue": run.queue.state_dict() if run.queue else None,
        "sampler": run.sampler.get_state(),
        "best": run.best,
        "evals": run.evals,
    }


def _restore(run: FinetuneRun, state: dict) -> None:
    run.batches.load_state_dict(state["batches"])
    if run.queue is not None and state["queue"] is not None:
        run.queue.load_state_dict(state["queue"])
    run.sampler.set_state(state["sampler"])
    run.best, run.evals = state["best"], state["evals"]


def _export(run: FinetuneRun, name: str) -> None:
    """The best-scoring student (by the first dev split's first metric) as a Hugging Face folder, with its scores."""
    out = run.cfg.export_dir.parent / name
    if rank() == 0:
        export_student(run.cfg.checkpoint_dir, out, tag=BEST if run.best else None, overwrite=True)
        files.write_text(out / "eval_results.json", json.dumps({"best": run.best, "history": run.evals}, indent=1))
        print(
            f"codir-ds: exported {name} (best {run.best.get('metric')} {run.best.get('score', float('nan')):.4f} "
            f"at step {run.best.get('step')}) to {out}",
            flush=True,
        )
    barrier()
