"""Stage 1: CoDIR pre-training distillation on DeepSpeed.

config -> data -> frozen (ZeRO-3) teacher forward -> all-gathered teacher features -> student loss
(MLM + KD + CoDIR against in-batch and queued negatives) -> engine.backward / engine.step -> enqueue
-> logs / checkpoints -> export.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import deepspeed
import torch
from transformers import AutoModel, AutoModelForMaskedLM

from ..checkpoint import seed_everything, seed_rank
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
from ..losses import contrastive_stats
from ..models import ModelPlan, build_student, load_teacher, load_tokenizer, plan_models
from ..negatives import NegativeQueue
from ..run_folder import hold_run_folder, open_checkpoints, run_identity
from ..universal import elastic_ds_config
from .config import PretrainConfig
from .data import MicroBatches, micro_batch_loader, training_corpus
from .modules import LossWeights, StudentWithHeads, TeacherFeatures


@dataclass
class PretrainRun:
    """What a finished (or stopped) run leaves in memory: engines, queue, data and the logged losses by step."""

    student: deepspeed.DeepSpeedEngine
    teacher: deepspeed.DeepSpeedEngine
    queue: NegativeQueue
    plan: ModelPlan
    data: MicroBatches
    temperature: float
    workers: int  # loader worker processes
    next_micro_batch: int = 0  # this rank's micro-batches consumed since the start of training
    batches: Iterator[dict] | None = None  # the loader, started at `next_micro_batch` on the first micro-step
    losses: list[dict[str, float]] = field(default_factory=list)
    stopped: bool = False  # stopped on request before train.max_steps

    @property
    def consumed_samples(self) -> int:
        """Samples all ranks have trained on, counted in whole optimizer steps: the data state of a checkpoint."""
        return self.next_micro_batch // self.data.a * self.global_batch

    @property
    def global_batch(self) -> int:
        return self.data.b * self.data.a * self.data.w


def run_pretraining(cfg: PretrainConfig, stop_after: int | None = None) -> PretrainRun:
    """Train to `cfg.train.max_steps` (or stop, checkpointed, after `stop_after` steps); export at the end.
    The run holds its output folder's lock throughout."""
    init_distributed(cfg.train.comm_timeout_minutes)
    with hold_run_folder(Path(cfg.output.dir)):
        return _pretrain(cfg, stop_after)


def _pretrain(cfg: PretrainConfig, stop_after: int | None) -> PretrainRun:
    plan = plan_models(cfg)  # configs and file headers only: bad input fails before any weights load
    check_length(plan.layout, cfg.data.max_seq_length, "data.max_seq_length")
    ds_config = load_ds_config(cfg.train, world_size())
    weights = loss_weights(cfg, plan)
    seed_everything(cfg.train.seed)
    tokenizer = load_tokenizer(cfg.teacher.path, "teacher.path")
    corpus = training_corpus(cfg.data, tokenizer, Path(cfg.output.dir))
    resume = open_checkpoints(cfg, run_identity(cfg, ds_config, {"layer_map": plan.layer_map, "data.corpus": corpus.digest}), elastic=True)
    if resume and resume.elastic:
        ds_config = elastic_ds_config(cfg.checkpoint_dir, resume, ds_config)

    teacher = build_teacher_engine(cfg, plan, ds_config, with_logits=weights.kd > 0)
    student = build_student_engine(cfg, plan, ds_config, weights)
    seed_rank(cfg.train.seed, rank())
    queue = NegativeQueue(cfg.codir.queue_length, plan.teacher_feature_dim, device=student.device)
    data = MicroBatches(
        corpus, cfg.train.micro_batch_size, cfg.train.gradient_accumulation_steps, world_size(), rank(), cfg.train.seed, cfg.data.mlm_probability
    )
    run = PretrainRun(student, teacher, queue, plan, data, cfg.codir.temperature, cfg.data.num_workers)

    result = train(cfg, student, _stage(run, cfg), tokenizer, resume, stop_after)
    run.batches = None  # ends the loader's workers
    run.losses, run.stopped = result.history, result.stopped
    if cfg.output.export and result.done == cfg.train.max_steps:
        if rank() == 0:
            print(f"codir-ds: exported student to {export_student(cfg.checkpoint_dir, cfg.export_dir, overwrite=True)}", flush=True)
        barrier()
    return run


def _stage(run: PretrainRun, cfg: PretrainConfig) -> Stage:
    teacher_total, teacher_here = parameter_counts(run.teacher.module)
    student_total, _ = parameter_counts(run.student.module.student)
    counts = run.data.corpus.meta["counts"]
    summary = (
        f"teacher {teacher_total / 1e6:.2f}M params ({teacher_here / 1e6:.2f}M on rank 0), student "
        f"{student_total / 1e6:.2f}M, layer map {run.plan.layer_map}, dtype {run.student.get_data_types()[0]}, "
        f"corpus {counts['blocks']:,} blocks of {run.data.corpus.block_length} tokens from {counts['documents']:,} documents"
    )
    return Stage(
        micro_step=lambda: micro_step(run),
        rank_state=lambda: _rank_state(run),
        restore=lambda state: _restore(run, state),
        scalars=lambda: _scalars(run),
        tokens_per_sample=cfg.data.max_seq_length,
        summary=summary,
        elastic=True,
    )


def micro_step(run: PretrainRun) -> dict[str, torch.Tensor]:
    """One forward/backward/step on this rank's next micro-batch; its loss terms and CoDIR statistics, detached."""
    if run.batches is None:
        pin = run.student.device.type == "cuda"
        run.batches = iter(micro_batch_loader(run.data, run.next_micro_batch, run.workers, pin_memory=pin))
    batch = next(run.batches)
    run.next_micro_batch += 1
    inputs = tuple(batch[k].to(run.student.device, non_blocking=True) for k in ("input_ids", "attention_mask", "labels"))
    with torch.no_grad():
        teacher_features, teacher_logits = run.teacher(*inputs)
    batch_features, offset = all_gather_rows(teacher_features)
    queued_features, _, _ = run.queue.valid()
    candidates = torch.cat([batch_features.to(queued_features.dtype), queued_features])
    positive_index = offset + torch.arange(len(teacher_features), device=run.student.device)
    terms, logits = run.student(*inputs, candidates, positive_index, teacher_logits)
    run.student.backward(terms["total"])
    run.student.step()
    run.queue.enqueue(batch_features)
    return {**{name: value.detach() for name, value in terms.items()}, **contrastive_stats(logits, positive_index, run.temperature)}


def _rank_state(run: PretrainRun) -> dict:
    """The data position (one integer, the same on every rank) and the queue (identical on every rank)."""
    return {"data": {"consumed_samples": run.consumed_samples, "global_batch": run.global_batch}, "queue": run.queue.state_dict()}


def _restore(run: PretrainRun, state: dict) -> None:
    saved = state["data"]
    if "consumed_samples" not in saved:
        raise CodirError("checkpoint: written by an earlier codir-ds (no data.consumed_samples); export it and start a new run from the export")
    if saved["global_batch"] != run.global_batch:
        raise CodirError(
            f"checkpoint: written with a global batch of {saved['global_batch']} samples, this run has "
            f"{run.global_batch} (micro_batch_size x gradient_accumulation_steps x world size); keep the "
            f"global batch when resuming, e.g. double train.gradient_accumulation_steps on half the ranks"
        )
    run.next_micro_batch = saved["consumed_samples"] // run.global_batch * run.data.a
    run.queue.load_state_dict(state["queue"])


def _scalars(run: PretrainRun) -> dict[str, float]:
    """Scalars beside the loss terms, on logging steps."""
    return {
        "lr": run.student.get_lr()[0],
        "codir/queue_fill": run.queue.fill_fraction,
        "data/consumed_samples": float(run.consumed_samples),
        "data/epoch": run.consumed_samples / len(run.data.corpus),
    }


def loss_weights(cfg: PretrainConfig, plan: ModelPlan) -> LossWeights:
    kd = cfg.loss.kd
    if kd > 0 and not plan.teacher_has_mlm_head:
        print0(
            f"codir-ds: notice: teacher {cfg.teacher.path} has no trained MLM head; "
            f"logit KD is off (loss.kd {kd} -> 0). CoDIR on hidden states still applies."
        )
        kd = 0.0
    return LossWeights(cfg.loss.mlm, kd, cfg.loss.kd_temperature, cfg.loss.codir, cfg.codir.temperature)


def build_teacher_engine(cfg: PretrainConfig, plan: ModelPlan, ds_config: dict, with_logits: bool):
    """The frozen teacher's feature (and MLM-logit) extractor, ZeRO-3 partitioned with `teacher.zero3`."""
    auto = AutoModelForMaskedLM if with_logits else AutoModel
    return teacher_engine(
        lambda: load_teacher(cfg.teacher.path, auto),
        lambda model: TeacherFeatures(model, plan.layer_map, cfg.codir.pooling, with_logits),
        ds_config,
        cfg.teacher.zero3,
    )


def build_student_engine(cfg: PretrainConfig, plan: ModelPlan, ds_config: dict, weights: LossWeights):
    student = build_student(cfg.student, cfg.teacher.path, plan.student_config, plan.layer_map)
    module = StudentWithHeads(student, plan.teacher_feature_dim, cfg.codir.projection_dim, cfg.codir.pooling, weights)
    return student_engine(module, ds_config, cfg.train.deepspeed_config)
