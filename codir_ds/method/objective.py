"""CoDIR's objective as one module: projection heads, candidates (the all-gathered batch plus queued, or banked,
teacher features), label- and example-aware masks, InfoNCE, its statistics and the enqueue.

Both stages call it in one line, `loss, stats = self.codir(student_features, teacher_features, labels, ids)`;
the loss math itself is pure functions in `losses.py`.
"""

from __future__ import annotations

import torch
from torch import nn

from ..runtime.distributed import all_gather_rows, device
from .losses import contrastive_logits, contrastive_stats, info_nce, normalized_fp32, sampled_contrastive_logits
from .memory_bank import MemoryBank
from .momentum_memory import MomentumMemory
from .negatives import NegativeQueue


class ProjectionHeads(nn.Module):
    """Two linear heads mapping student and teacher features to a shared, L2-normalised space. The heads run
    in the model's precision; their outputs are normalised in float32 (or float64), whatever that is."""

    def __init__(self, student_dim: int, teacher_dim: int, projection_dim: int = 128):
        super().__init__()
        self.student = nn.Linear(student_dim, projection_dim)
        self.teacher = nn.Linear(teacher_dim, projection_dim)

    def project_student(self, features: torch.Tensor) -> torch.Tensor:
        return normalized_fp32(self.student(features.to(self.student.weight.dtype)))

    def project_teacher(self, features: torch.Tensor) -> torch.Tensor:
        return normalized_fp32(self.teacher(features.to(self.teacher.weight.dtype)))


class CodirObjective(nn.Module):
    """InfoNCE between projected student features (anchors) and pre-projection teacher features (candidates).

    Negatives come from one of two sources:
    - `queue`: every rank's batch (all-gathered) then the FIFO queue, shared by all anchors. A batch's rows join
      the queue when the next micro-step begins (after this one's backward, which still reads the queue), so
      a step sees exactly the rows of the steps before it.
    - `bank`: `num_negatives` rows per anchor drawn from the memory bank by `sampler` (a label other than the
      anchor's; any other example for regression). With a `memory` (`codir.objective: crd_nce`), the drawn rows are
      read from CRD's momentum memory instead and scored with its binary NCE (`momentum_memory.py`).
    With `labels`, queued candidates of the anchor's label are masked out (label-aware negatives); with example
    `ids`, so are other copies of the anchor's own example. The anchor's positive is never masked.
    """

    def __init__(
        self,
        student_dim: int,
        teacher_dim: int,
        projection_dim: int,
        contrastive_temperature: float,
        queue: NegativeQueue | None = None,
        bank: MemoryBank | None = None,
        num_negatives: int = 0,
        sampler: torch.Generator | None = None,
        memory: MomentumMemory | None = None,
    ):
        super().__init__()
        if (queue is None) == (bank is None):
            raise ValueError("CodirObjective takes a queue or a bank of negatives, not both")
        if memory is not None and bank is None:
            raise ValueError("CodirObjective: a momentum memory draws its rows through a bank")
        self.heads = ProjectionHeads(student_dim, teacher_dim, projection_dim)
        self.tau = contrastive_temperature
        self.queue, self.bank, self.num_negatives, self.sampler, self.memory = queue, bank, num_negatives, sampler, memory
        self._pending: tuple | None = None  # the last batch's (features, labels, ids), enqueued at the next call

    def forward(
        self, student_features: torch.Tensor, teacher_features: torch.Tensor, labels: torch.Tensor | None = None, ids: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """InfoNCE loss of this rank's anchors and its statistics (detached): `student_features` [B, Fs] and
        `teacher_features` [B, Ft] are the pooled mapped layers of the same samples."""
        anchors = self.heads.project_student(student_features)
        if self.memory is not None:
            rows = self.bank.sample_negatives(ids, labels, self.num_negatives, self.sampler)
            loss, logits = self.memory(anchors, self.heads.project_teacher(teacher_features), ids, rows)
            positive_index = torch.zeros(len(anchors), dtype=torch.long, device=anchors.device)
            return loss, contrastive_stats(logits, positive_index, self.tau)
        if self.bank is not None:
            logits, positive_index = self._bank_logits(anchors, teacher_features, labels, ids)
        else:
            logits, positive_index = self._queue_logits(anchors, teacher_features, labels, ids)
        return info_nce(logits, positive_index), contrastive_stats(logits.detach(), positive_index, self.tau)

    def _bank_logits(self, anchors, teacher_features, labels, ids):
        rows = self.bank.sample_negatives(ids, labels, self.num_negatives, self.sampler)
        project = self.heads.project_teacher
        logits = sampled_contrastive_logits(anchors, project(teacher_features), project(self.bank.features[rows]), self.tau)
        return logits, torch.zeros(len(anchors), dtype=torch.long, device=anchors.device)

    def _queue_logits(self, anchors, teacher_features, labels, ids):
        self.enqueue_pending()
        batch_features, offset = all_gather_rows(teacher_features)
        queued_features, queued_labels, queued_ids = self.queue.stored()
        positive_index = offset + torch.arange(len(anchors), device=anchors.device)
        candidates = torch.cat([self.heads.project_teacher(batch_features), self.heads.project_teacher(queued_features)])
        masks = {}
        batch_ids = batch_labels = None
        if ids is not None:
            batch_ids = all_gather_rows(ids)[0]
            masks.update(anchor_ids=ids, candidate_ids=torch.cat([batch_ids, queued_ids]))
        if labels is not None:
            batch_labels = all_gather_rows(labels)[0]
            masks.update(anchor_labels=labels, candidate_labels=torch.cat([batch_labels, queued_labels]))
        self._pending = (batch_features, batch_labels, batch_ids)
        return contrastive_logits(anchors, candidates, positive_index, self.tau, **masks), positive_index

    def enqueue_pending(self) -> None:
        """Move the last batch's rows into the queue (call only once that batch's backward is done)."""
        if self._pending is not None:
            self.queue.enqueue(*self._pending)
            self._pending = None

    def negatives_state(self) -> dict:
        """What a checkpoint keeps of the negatives: the queue (pending rows included) and the bank's sampler."""
        if self.queue is not None:
            self.enqueue_pending()
        return {"queue": self.queue.state_dict() if self.queue is not None else None, "sampler": self.sampler.get_state() if self.sampler else None}

    def load_negatives_state(self, state: dict) -> None:
        """Inverse of `negatives_state`."""
        self._pending = None
        if self.queue is not None and state.get("queue") is not None:
            self.queue.load_state_dict(state["queue"])
        if self.sampler is not None and state.get("sampler") is not None:
            self.sampler.set_state(state["sampler"])

    def scalars(self) -> dict[str, float]:
        """Logged beside the loss terms: how full the queue is."""
        if self.queue is None:
            return {}
        self.enqueue_pending()
        return {"codir/queue_fill": self.queue.fill_fraction}


def run_objective(codir, student_config, teacher_feature_dim: int, bank: MemoryBank | None = None, sampler: torch.Generator | None = None):
    """The objective a run's `codir` section asks for on this student (anchors: all its layers pooled, concatenated):
    K = `codir.num_negatives` per anchor from `bank`, drawn by `sampler` (scored against CRD's momentum memory with
    `codir.objective: crd_nce`), or else the queue of `codir.queue_length` rows on this rank's device."""
    width = student_config.num_hidden_layers * student_config.hidden_size
    args = (width, teacher_feature_dim, codir.projection_dim, codir.temperature)
    if bank is not None:
        memory = None
        if codir.objective == "crd_nce":  # a bank comes with stage 2's codir section
            memory = MomentumMemory(len(bank), codir.projection_dim, codir.temperature, codir.momentum)
        return CodirObjective(*args, bank=bank, num_negatives=codir.num_negatives, sampler=sampler, memory=memory)
    return CodirObjective(*args, queue=NegativeQueue(codir.queue_length, teacher_feature_dim, device=device()))
