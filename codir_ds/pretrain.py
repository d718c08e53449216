"""Stage 1: CoDIR pre-training distillation on DeepSpeed.

config -> data -> frozen (ZeRO-3) teacher forward -> all-gathered teacher features -> student loss
(MLM + KD + CoDIR against in-batch and queued negatives) -> engine.backward / engine.step -> enqueue
-> logs / checkpoints -> export.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import deepspeed
import torch
from transformers import AutoModel, AutoModelForMaskedLM

from .checkpoint import load_checkpoint, resolve_resume_tag, save_checkpoint, seed_everything
from .config import PretrainConfig, config_to_dict
from .data import PackedMLMStream, load_corpus
from .distiller import LossWeights, StudentWithHeads, TeacherFeatures
from .distributed import all_gather_rows, barrier, init_distributed, rank, world_size
from .ds_config import load_ds_config
from .engines import parameter_counts, student_engine, teacher_engine
from .export import export_student, save_student_spec
from .models import ModelPlan, build_student, load_teacher, load_tokenizer, plan_models
from .monitor import Monitor, average_terms, averaged_scalars
from .negatives import NegativeQueue
from .objective import contrastive_stats
from .preemption import StopRequest, end_of_step


@dataclass
class PretrainRun:
    """What a finished (or stopped) run leaves in memory: engines, queue and per-step losses of this rank."""

    student: deepspeed.DeepSpeedEngine
    teacher: deepspeed.DeepSpeedEngine
    queue: NegativeQueue
    plan: ModelPlan
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
    run = PretrainRun(student, teacher, queue, plan)

    checkpoints, start = cfg.checkpoint_dir, 0
    tag = resolve_resume_tag(checkpoints, cfg.checkpoint.resume)
    if tag:
        state = load_checkpoint(student, checkpoints, tag)
        stream.load_state_dict(state["data"])
        queue.load_state_dict(state["queue"])
        start = state["step"]
    elif rank() == 0:
        save_student_spec(checkpoints, student.module.student, tokenizer)
    monitor = Monitor(cfg.tensorboard_dir, cfg.train.max_steps, start, cfg.logging.every, cfg.logging.progress_bar)
    _announce(cfg, run, tag, monitor)

    last = min(cfg.train.max_steps, stop_after or cfg.train.max_steps)
    stop, done = StopRequest(cfg.stop_file), start
    for step in range(start + 1, last + 1):
        terms = [micro_step(run, stream, cfg) for _ in range(cfg.train.gradient_accumulation_steps)]
        run.losses.append(average_terms(terms))
        samples = cfg.train.micro_batch_size * cfg.train.gradient_accumulation_steps * world_size()
        monitor.step(step, samples, samples * cfg.data.max_seq_length, _scalars(run, stream, step, cfg))
        done = step
        if end_of_step(stop, step, last, cfg.checkpoint.every, student.device,
                       lambda: save_checkpoint(student, checkpoints, step, _rank_state(stream, queue), cfg.checkpoint.keep)):
            break
    stop.close()
    monitor.close()
    if cfg.output.export and done == cfg.train.max_steps:
        if rank() == 0:
            print(f"codir-ds: exported student to {export_student(checkpoints, cfg.export_dir)}", flush=True)
        barrier()
    return run


def micro_step(run: PretrainRun, stream: PackedMLMStream, cfg: PretrainConfig) -> dict[str, float]:
    batch = {k: v.to(run.student.device) for k, v in stream.next_batch().items()}
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
    stats = contrastive_stats(logits, positive_index, cfg.codir.temperature)
    return {**{name: value.item() for name, value in terms.items()}, **stats}


def _rank_state(stream: PackedMLMStream, queue: NegativeQueue) -> dict:
    return {"data": stream.state_dict(), "queue": queue.state_dict()}


def _scalars(run: PretrainRun, stream: PackedMLMStream, step: int, cfg: PretrainConfig) -> dict[str, float]:
    """This step's scalars for TensorBoard, averaged over ranks on logging steps."""
    if step % cfg.logging.every:
        return {}
    scalars = averaged_scalars(run.losses[-1], run.student.device)
    scalars["lr"] = run.student.get_lr()[0]
    scalars["codir/queue_fill"] = run.queue.fill_fraction
    scalars.update({f"data/{k}": float(v) for k, v in stream.state.counts.items()})
    return scalars


def loss_weights(cfg: PretrainConfig, plan: ModelPlan) -> LossWeights:
    kd = cfg.loss.kd
    if kd > 0 and not plan.teacher_has_mlm_head:
        if rank() == 0:
            print(f"codir-ds: notice: teacher {cfg.teacher.path} has no trained MLM head; "
                  f"logit KD is off (loss.kd {kd} -> 0). CoDIR on hidden states still applies.", flush=True)
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


def _announce(cfg: PretrainConfig, run: PretrainRun, resumed_from: str | None, monitor: Monitor) -> None:
    teacher_total, teacher_here = parameter_counts(run.teacher.module)
    student_total, _ = parameter_counts(run.student.module.student)
    resolved = json.dumps(config_to_dict(cfg), separators=(",", ":"))
    monitor.text("config", resolved)
    if rank() == 0:
        print(f"codir-ds: config {resolved}", flush=True)
        print(f"codir-ds: teacher {teacher_total / 1e6:.2f}M params ({teacher_here / 1e6:.2f}M on rank 0), "
              f"student {student_total / 1e6:.2f}M, layer map {run.plan.layer_map}, world {world_size()}, "
              f"dtype {run.student.get_data_types()[0]}, "
              + (f"resumed from {resumed_from}" if resumed_from else "fresh start"), flush=True)
