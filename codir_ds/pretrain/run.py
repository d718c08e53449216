"""Stage 1: CoDIR pre-training distillation on DeepSpeed.

config -> data -> frozen (ZeRO-3) teacher forward -> student loss: MLM + KD + CoDIR (the objective gathers
every rank's teacher features and contrasts them with the queue) -> engine.backward / engine.step -> logs /
checkpoints -> export.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from pathlib import Path

import torch
from transformers import AutoModel, AutoModelForMaskedLM

from ..method.objective import run_objective
from ..models.ds_config import load_ds_config
from ..models.encoders import check_length
from ..models.engines import frozen_teacher, parameter_counts, student_engine
from ..models.loading import ModelPlan, build_student
from ..runs.monitor import Monitor
from ..runtime.distributed import print0, rank, world_size
from ..runtime.errors import CodirError
from ..runtime.seeding import seed_rank
from ..stage import Stage, run_stage
from .config import PretrainConfig
from .data import MicroBatches, micro_batch_loader, training_corpus
from .evaluation import HeldOutBatches, evaluate, evaluation_split
from .modules import LossWeights, StudentWithHeads, TeacherFeatures


def run_pretraining(cfg: PretrainConfig, stop_after: int | None = None) -> PretrainStage:
    """Train to `cfg.train.max_steps` (or stop, checkpointed, after `stop_after` steps); export at the end."""
    return run_stage(PretrainStage, cfg, stop_after)


class PretrainStage(Stage):
    """Stage 1 on this rank: the engines, the CoDIR objective (its queue), the data and its position."""

    elastic = True  # data position and queue are the same on every rank

    def __init__(self, cfg: PretrainConfig, plan: ModelPlan):
        check_length(plan.layout, cfg.data.max_seq_length, "data.max_seq_length")
        self.ds_config = load_ds_config(cfg.train, world_size())  # a bad DeepSpeed config fails before the corpus is read
        self.weights = loss_weights(cfg, plan)
        super().__init__(cfg, plan)
        self.corpus = training_corpus(cfg.data, self.tokenizer, Path(cfg.output.dir))
        eval_corpus, eval_blocks, held_out = evaluation_split(cfg.data, self.corpus, self.tokenizer)
        train, probability = cfg.train, cfg.data.mlm_probability
        self.data = MicroBatches(
            self.corpus, train.micro_batch_size, train.gradient_accumulation_steps, world_size(), rank(), train.seed, probability, held_out
        )
        self.held_out = HeldOutBatches(eval_corpus, eval_blocks, cfg.eval.batch_size, world_size(), rank(), probability) if len(eval_blocks) else None
        self.evals: list[dict] = []  # {"step", "metrics"} of each held-out evaluation
        self.tokens_per_sample = cfg.data.max_seq_length
        self.next_micro_batch = 0  # this rank's micro-batches consumed since the start of training
        self.batches: Iterator[dict] | None = None  # the loader, started at `next_micro_batch` on the first micro-step

    def identity(self) -> dict:
        return {"data.corpus": self.corpus.digest}

    def build(self, ds_config: dict) -> None:
        cfg, plan = self.cfg, self.plan
        auto = AutoModelForMaskedLM if self.weights.kd > 0 else AutoModel
        wrap = functools.partial(TeacherFeatures, layer_map=plan.layer_map, pooling=cfg.codir.pooling, with_logits=self.weights.kd > 0)
        self.teacher = frozen_teacher(cfg.teacher.path, auto, wrap, ds_config, cfg.teacher.zero3)
        student = build_student(cfg.student, cfg.teacher.path, plan.student_config, plan.layer_map)
        self.objective = run_objective(cfg.codir, student.config, plan.teacher_feature_dim)
        module = StudentWithHeads(student, self.objective, cfg.codir.pooling, self.weights)
        self.student = student_engine(module, ds_config, cfg.train.deepspeed_config)
        seed_rank(cfg.train.seed, rank())

    def summary(self) -> str:
        teacher_total, teacher_here = parameter_counts(self.teacher)
        student_total, _ = parameter_counts(self.student.module.student)
        counts = self.corpus.meta["counts"]
        return (
            f"teacher {teacher_total / 1e6:.2f}M params ({teacher_here / 1e6:.2f}M on rank 0), student "
            f"{student_total / 1e6:.2f}M, layer map {self.plan.layer_map}, dtype {self.student.get_data_types()[0]}, "
            f"corpus {counts['blocks']:,} blocks of {self.corpus.block_length} tokens from {counts['documents']:,} documents, "
            f"{self.held_out.count if self.held_out else 0} blocks held out for evaluation"
        )

    @property
    def global_batch(self) -> int:
        return self.data.micro_batch_size * self.data.accumulation_steps * self.data.world_size

    @property
    def consumed_samples(self) -> int:
        """Samples all ranks have trained on, counted in whole optimizer steps: the data state of a checkpoint."""
        return self.next_micro_batch // self.data.accumulation_steps * self.global_batch

    def micro_step(self) -> dict[str, torch.Tensor]:
        if self.batches is None:
            pin = self.student.device.type == "cuda"
            self.batches = iter(micro_batch_loader(self.data, self.next_micro_batch, self.cfg.data.num_workers, pin_memory=pin))
        batch = next(self.batches)
        self.next_micro_batch += 1
        input_ids, labels, positions = (batch[k].to(self.student.device, non_blocking=True) for k in ("input_ids", "labels", "masked_positions"))
        with torch.no_grad():  # no attention mask: packed blocks are never padded
            teacher_features, teacher_logits = self.teacher(input_ids, None, positions)
        terms, stats = self.student(input_ids, None, labels, positions, teacher_features, teacher_logits)
        self.student.backward(terms["total"])
        self.student.step()
        return {**{name: value.detach() for name, value in terms.items()}, **stats}

    def state_dict(self) -> dict:
        """The data position (one integer, the same on every rank) and the queue (identical on every rank)."""
        data = {"consumed_samples": self.consumed_samples, "global_batch": self.global_batch}
        return {"data": data, "queue": self.objective.negatives_state()["queue"], "eval": self.evals[-1] if self.evals else None}

    def load_state_dict(self, state: dict) -> None:
        saved = state["data"]
        if "consumed_samples" not in saved:
            raise CodirError("checkpoint: written by an earlier codir-ds (no data.consumed_samples); export it and start a new run from the export")
        if saved["global_batch"] != self.global_batch:
            raise CodirError(
                f"checkpoint: written with a global batch of {saved['global_batch']} samples, this run has "
                f"{self.global_batch} (micro_batch_size x gradient_accumulation_steps x world size); keep the "
                f"global batch when resuming, e.g. double train.gradient_accumulation_steps on half the ranks"
            )
        self.next_micro_batch = saved["consumed_samples"] // self.global_batch * self.data.accumulation_steps
        self.objective.load_negatives_state({"queue": state["queue"]})
        self.evals = [state["eval"]] if state.get("eval") else []

    def scalars(self) -> dict[str, float]:
        return {
            **super().scalars(),
            **self.objective.scalars(),
            "data/consumed_samples": float(self.consumed_samples),
            "data/epoch": self.consumed_samples / self.data.training_blocks,
        }

    def after_step(self, step: int, monitor: Monitor) -> None:
        """Evaluate on the held-out blocks every `eval.every` steps and after the last."""
        every, last = self.cfg.eval.every, self.cfg.train.max_steps
        if self.held_out is None or not (step == last or (every and step % every == 0)):
            return
        self.student.eval()
        metrics = evaluate(self.student.module, self.teacher, self.held_out, self.student.device)
        self.student.train()
        self.evals.append({"step": step, "metrics": metrics})
        monitor.scalars(step, {f"eval/{name}": value for name, value in metrics.items()})
        print0(f"codir-ds: eval step {step} on {self.held_out.count} held-out blocks: " + " ".join(f"{k} {v:.4f}" for k, v in metrics.items()))

    def finish(self, result) -> None:
        super().finish(result)
        self.batches = None  # ends the loader's workers


def loss_weights(cfg: PretrainConfig, plan: ModelPlan) -> LossWeights:
    """The `loss.*` weights; KD off (with a notice) when the teacher has no trained masked-LM head."""
    kd = cfg.loss.kd
    if kd > 0 and not plan.teacher_has_mlm_head:
        print0(
            f"codir-ds: notice: teacher {cfg.teacher.path} has no trained MLM head; "
            f"logit KD is off (loss.kd {kd} -> 0). CoDIR on hidden states still applies."
        )
        kd = 0.0
    return LossWeights(cfg.loss.mlm, kd, cfg.loss.kd_temperature, cfg.loss.codir)
