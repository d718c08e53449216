"""The same-work floor: codir-ds's stage-1 micro-step written out in plain PyTorch (no DeepSpeed, no codir_ds).

One step on a masked micro-batch:
  teacher forward (no grad, hidden states) -> mean-pooled mapped layers, MLM logits at the masked positions
  student forward -> MLM cross-entropy and T^2 KL to the teacher at the masked positions only
  -> mean-pooled student layers -> both projection heads -> InfoNCE over the batch + K queued teacher features
  -> backward -> clip the gradient norm -> AdamW (fused on CUDA, foreach elsewhere) -> lr schedule -> enqueue.

Precision follows the DeepSpeed config: fp32, or (bf16 enabled) fp32 master weights with bf16 autocast and a
bf16 teacher. Masked positions come as a fixed number per sample ([batch, m] indices), gathered, so no step
depends on tensor values on the host. On one process the all-gather of teacher features is the identity.
`step_speed.py` times it; `tests/test_step_equality.py` checks it against codir-ds's micro-step.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class FloorSettings:
    """What a codir-ds run fixes for its step: the objective and the DeepSpeed config (optimizer, schedule, clipping, precision)."""

    layer_map: list[int]  # teacher layer (1-based) per student layer
    mlm: float  # loss weights
    kd: float
    kd_temperature: float
    codir: float
    temperature: float  # InfoNCE tau
    queue_length: int  # K queued teacher features
    projection_dim: int
    ds_config: dict  # the student's resolved DeepSpeed config


def masked_batch(batch: int, seq: int, vocab: int, generator: torch.Generator, mask_id: int = 4, first_id: int = 5) -> dict[str, torch.Tensor]:
    """Random ids with round(0.15 * seq) masked positions per sample (never the first or last token), as codir-ds's
    loader hands them over: input_ids with [MASK] there, labels (-100 elsewhere) and masked_positions [batch, m], sorted."""
    masked = max(1, round(0.15 * seq))
    ids = torch.randint(first_id, vocab, (batch, seq), generator=generator)
    positions = torch.rand(batch, seq - 2, generator=generator).argsort(dim=1)[:, :masked].sort(dim=1).values + 1
    labels = torch.full_like(ids, -100).scatter_(1, positions, ids.gather(1, positions))
    inputs = ids.scatter(1, positions, mask_id)
    return {"input_ids": inputs, "labels": labels, "masked_positions": positions}


class Heads(nn.Module):
    """The two projection heads (attribute names as codir-ds's, so its state dict loads)."""

    def __init__(self, student_dim: int, teacher_dim: int, projection_dim: int):
        super().__init__()
        self.student = nn.Linear(student_dim, projection_dim)
        self.teacher = nn.Linear(teacher_dim, projection_dim)


class Queue:
    """K teacher features in a preallocated ring buffer; the pointer is a host integer (no sync)."""

    def __init__(self, features: torch.Tensor):
        self.features, self.pointer = features, 0
        self.offsets = None

    @torch.no_grad()
    def enqueue(self, rows: torch.Tensor) -> None:
        length = len(self.features)
        if self.offsets is None or len(self.offsets) != len(rows):
            self.offsets = torch.arange(len(rows), device=rows.device)
        self.features.index_copy_(0, (self.offsets + self.pointer) % length, rows.float())
        self.pointer = (self.pointer + len(rows)) % length


def mean_pool(hidden_states, layers) -> torch.Tensor:
    """Mean over tokens of each chosen layer (packed blocks: no padding), concatenated: [batch, len(layers) * dim]."""
    return torch.cat([hidden_states[layer].mean(dim=1) for layer in layers], dim=-1)


def at(hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Rows of hidden [batch, seq, dim] at positions [batch, m], flattened: [batch * m, dim]."""
    return hidden.gather(1, positions.unsqueeze(-1).expand(-1, -1, hidden.shape[-1])).flatten(0, 1)


def floor_terms(teacher, student, heads: Heads, batch: dict, queued: torch.Tensor, s: FloorSettings):
    """The loss terms of one micro-batch ({total, mlm, kd, codir}) and the batch's teacher features (to enqueue).
    `teacher` and `student` are BertForMaskedLM; `queued` the K stored teacher features [K, N * d_t]."""
    ids, positions = batch["input_ids"], batch["masked_positions"]
    with torch.no_grad():  # packed blocks are never padded: no attention mask
        out = teacher.bert(input_ids=ids, output_hidden_states=True)
        teacher_features = mean_pool(out.hidden_states, s.layer_map)
        teacher_logits = teacher.cls(at(out.last_hidden_state, positions)) if s.kd > 0 else None

    out = student.bert(input_ids=ids, output_hidden_states=True)
    logits = student.cls(at(out.last_hidden_state, positions)).float()
    terms = {"mlm": F.cross_entropy(logits, batch["labels"].gather(1, positions).flatten())}
    if teacher_logits is not None:
        t = s.kd_temperature
        kl = F.kl_div(F.log_softmax(logits / t, dim=-1), F.log_softmax(teacher_logits.float() / t, dim=-1), log_target=True, reduction="batchmean")
        terms["kd"] = kl * t**2
    anchors = F.normalize(heads.student(mean_pool(out.hidden_states, range(1, len(s.layer_map) + 1))).float(), dim=-1)
    candidates = F.normalize(heads.teacher(torch.cat([teacher_features.float(), queued])).float(), dim=-1)
    similarities = anchors @ candidates.T / s.temperature
    terms["codir"] = F.cross_entropy(similarities, torch.arange(len(ids), device=ids.device))
    total = s.mlm * terms["mlm"] + s.kd * terms.get("kd", 0.0) + s.codir * terms["codir"]
    return {"total": total, **terms}, teacher_features


def warmup_decay(params: dict):
    """DeepSpeed's WarmupDecayLR (log warm-up, then linear decay), as a function of the optimizer step."""
    low, high = params.get("warmup_min_lr", 0.0), params["warmup_max_lr"]
    warmup, total = max(2, params["warmup_num_steps"]), params["total_num_steps"]

    def lr(step: int) -> float:
        it = step - 1  # DeepSpeed's scheduler starts at iteration -1 (min lr) and steps after each optimizer step
        if it < 0:
            gamma = 0.0
        elif it < warmup:
            gamma = math.log(it + 1) / math.log(warmup)
        else:
            gamma = max(0.0, (total - it) / max(1.0, total - warmup))
        return low + (high - low) * gamma

    return lr


class FloorStep:
    """One optimizer step per call, on the given micro-batch; returns the detached loss terms."""

    def __init__(self, teacher, student, heads: Heads, queued: torch.Tensor, settings: FloorSettings):
        ds = settings.ds_config
        self.teacher, self.student, self.heads, self.settings = teacher, student, heads, settings
        device = next(student.parameters()).device
        self.bf16 = bool(ds.get("bf16", {}).get("enabled"))
        if self.bf16:
            teacher.to(torch.bfloat16)  # as DeepSpeed keeps the teacher; the student stays fp32 (master weights)
        self.autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if self.bf16 else contextlib.nullcontext
        self.queue = Queue(queued.clone().float())
        self.params = [*student.parameters(), *heads.parameters()]
        opt = ds["optimizer"]["params"]
        fused = device.type == "cuda"
        self.optimizer = torch.optim.AdamW(
            self.params, lr=opt["lr"], betas=tuple(opt["betas"]), eps=opt["eps"], weight_decay=opt["weight_decay"], fused=fused, foreach=not fused
        )
        self.lr = warmup_decay(ds["scheduler"]["params"])
        self.clip = ds.get("gradient_clipping", 0.0)
        self.steps = 0
        self._set_lr()

    def _set_lr(self) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr(self.steps)

    def __call__(self, batch: dict) -> dict[str, torch.Tensor]:
        with self.autocast():
            terms, teacher_features = floor_terms(self.teacher, self.student, self.heads, batch, self.queue.features, self.settings)
        terms["total"].backward()
        if self.clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.clip, foreach=True)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.steps += 1
        self._set_lr()
        self.queue.enqueue(teacher_features)
        return {name: value.detach() for name, value in terms.items()}
