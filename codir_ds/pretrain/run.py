"""Stage 1: CoDIR pre-training distillation on DeepSpeed.

config -> data -> frozen (ZeRO-3) teacher forward -> all-gathered teacher features -> student loss
(MLM + KD + CoDIR against in-batch and queued negatives) -> engine.backward / engine.step -> enqueue
-> logs / checkpoints -> export.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import deepspeed
import torch
from transformers import AutoModel, AutoModelForMaskedLM

from ..checkpoint import seed_everything
from ..distributed import (
    all_gather_rows,
    barrier,
    init_distributed,
    print0,
    rank,
    world_size,
)
from ..ds_config import load_ds_config
from ..engines import parameter_counts, student_engine, teacher_engine
from ..export import export_student
from ..loop import Stage, train
from ..losses import contrastive_stats
from ..models import ModelPlan, build_student, load_teacher, load_tokenizer, plan_models
from ..negatives import NegativeQueue
from .config import PretrainConfig
from .data import PackedMLMStream, load_corpus
from .modules import LossWeights, StudentWithHeads, TeacherFeatures


@dataclass
class PretrainRun:
    """What a finished (or stopped) run leaves in memory: engines, queue, data and the logged losses by step."""

    student: deepspeed.DeepSpeedEngine
    teacher: deepspeed.DeepSpeedEngine
    queue: NegativeQueue
    plan: ModelPlan
    stream: PackedMLMStream
    temperature: float
    losses: list[dict[str, float]] = field(default_factory=list)


def run_pretraining(cfg: PretrainConfig, stop_after: int | None = None) -> PretrainRun:
    """Train to `cfg.train.max_steps` (or stop, checkpointed, after `stop_after` steps); export at the end."""
    init_distributed(cfg.train.comm_timeout_minutes)
    plan = plan_models(cfg)  # configs and file headers only: bad input fails before any weights load
    ds_config = load_ds_config(cfg.train, world_size())
    weights = loss_weights(cfg, plan)
    seed_everything(cfg.train.seed)
    tokenizer = load_tokenizer(cfg.teacher.path, "teacher.path")
    _prepare_corpus(cfg)

    teacher = build_teacher_engine(cfg, plan, ds_config, with_logits=weights.kd > 0)
    student = build_student_engine(cfg, plan, ds_config, weights)
    queue = NegativeQueue(cfg.codir.queue_length, plan.teacher_feature_dim, device=student.device)
    stream = PackedMLMStream(cfg.data, tokenizer, cfg.train.micro_batch_size, rank(), world_size(), cfg.train.seed)
    run = PretrainRun(student, teacher, queue, plan, stream, cfg.codir.temperature)

    result = train(cfg, student, _stage(run, cfg), tokenizer, stop_after)
    run.losses = result.history
    if cfg.output.export and result.done == cfg.train.max_steps:
        if rank() == 0:
            print(f"codir-ds: exported student to {export_student(cfg.checkpoint_dir, cfg.export_dir)}", flush=True)
        barrier()
    return run


def _stage(run: PretrainRun, cfg: PretrainConfig) -> Stage:
    teacher_total, teacher_here = parameter_counts(run.teacher.module)
    student_total, _ = parameter_counts(run.student.module.student)
    summary = (f"teacher {teacher_total / 1e6:.2f}M params ({teacher_here / 1e6:.2f}M on rank 0), student "
               f"{student_total / 1e6:.2f}M, layer map {run.plan.layer_map}, dtype {run.student.get_data_types()[0]}")

    def restore(state: dict) -> None:
        run.stream.load_state_dict(state["data"])
        run.queue.load_state_dict(state["queue"])

    return Stage(micro_step=lambda: micro_step(run),
                 rank_state=lambda: {"data": run.stream.state_dict(), "queue": run.queue.state_dict()},
                 restore=restore, scalars=lambda: _scalars(run), tokens_per_sample=cfg.data.max_seq_length, summary=summary)


def micro_step(run: PretrainRun) -> dict[str, torch.Tensor]:
    """One forward/backward/step on this rank's next micro-batch; its loss terms and CoDIR statistics, detached."""
    batch = {k: v.to(run.student.device) for k, v in run.stream.next_batch().items()}
    inputs = (batch["input_ids"], batch["attention_mask"], batch["labels"])
    with torch.no_grad():
        teacher_features, teacher_logits = run.teacher(*inputs)
    batch_features, offset = all_gather_rows(teacher_features)
    queued_features, _ = run.queue.valid()
    candidates = torch.cat([batch_features.to(queued_features.dtype), queued_features])
    positive_index = offset + torch.arange(len(teacher_features), device=run.student.device)
    terms, logits = run.student(*inputs, candidates, positive_index, teacher_logits)
    run.student.backward(terms["total"])
    run.student.step()
    run.queue.enqueue(batch_features)
    return {**{name: value.detach() for name, value in terms.items()}, **contrastive_stats(logits, positive_index, run.temperature)}


def _scalars(run: PretrainRun) -> dict[str, float]:
    """Scalars beside the loss terms, on logging steps."""
    return {"lr": run.student.get_lr()[0], "codir/queue_fill": run.queue.fill_fraction,
            **{f"data/{k}": float(v) for k, v in run.stream.state.counts.items()}}


def loss_weights(cfg: PretrainConfig, plan: ModelPlan) -> LossWeights:
    kd = cfg.loss.kd
    if kd > 0 and not plan.teacher_has_mlm_head:
        print0(f"codir-ds: notice: teacher {cfg.teacher.path} has no trained MLM head; "
                f"logit KD is off (loss.kd {kd} -> 0). CoDIR on hidden states still applies.")
        kd = 0.0
    return LossWeights(cfg.loss.mlm, kd, cfg.loss.kd_temperature, cfg.loss.codir, cfg.codir.temperature)


def build_teacher_engine(cfg: PretrainConfig, plan: ModelPlan, ds_config: dict, with_logits: bool):
    """The frozen teacher's feature (and MLM-logit) extractor, ZeRO-3 partitioned with `teacher.zero3`."""
    auto = AutoModelForMaskedLM if with_logits else AutoModel
    return teacher_engine(lambda: load_teacher(cfg.teacher.path, auto),
                          lambda model: TeacherFeatures(model, plan.layer_map, cfg.codir.pooling, with_logits),
                          ds_config, cfg.teacher.zero3)


def build_student_engine(cfg: PretrainConfig, plan: ModelPlan, ds_config: dict, weights: LossWeights):
    student = build_student(cfg.student, cfg.teacher.path, plan.student_config, plan.layer_map)
    module = StudentWithHeads(student, plan.teacher_feature_dim, cfg.codir.projection_dim, cfg.codir.pooling, weights)
    return student_engine(module, ds_config, cfg.train.deepspeed_config)


def _prepare_corpus(cfg: PretrainConfig) -> None:
    """Open the corpus on rank 0 first: bad data fails early, and other ranks reuse the prepared cache."""
    if rank() == 0:
        load_corpus(cfg.data, epoch=0, seed=cfg.train.seed)
    barrier()
