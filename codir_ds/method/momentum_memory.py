"""CRD's memory (Tian et al., 2020), as the CoDIR authors' code uses it: for every training example, a momentum
average of its projected student and of its projected teacher feature. Each student anchor is scored against teacher
rows (its own first, then K negatives), each teacher anchor against student rows, and both with `binary_nce`."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..runtime.distributed import all_gather_rows
from .losses import binary_nce


class MomentumMemory(nn.Module):
    """Rows [N, dim] of both sides, initialised uniformly in +-1/sqrt(dim/3) (CRD's), and the two normalisers Z, set
    at the first call to the mean score times N and fixed afterwards; all buffers, so checkpoints carry them."""

    def __init__(self, size: int, dim: int, temperature: float, momentum: float):
        super().__init__()
        bound = 1 / math.sqrt(dim / 3)
        self.register_buffer("student_rows", torch.rand(size, dim) * 2 * bound - bound)
        self.register_buffer("teacher_rows", torch.rand(size, dim) * 2 * bound - bound)
        self.register_buffer("normalisers", torch.full((2,), -1.0))  # Z of the student's scores, Z of the teacher's
        self.tau, self.momentum = temperature, momentum

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, ids: torch.Tensor, negatives: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The loss of this rank's anchors, unit rows `student` and `teacher` [B, dim] of examples `ids`, against the
        rows `negatives` [B, K], and the student's similarities / tau [B, 1 + K] (for the statistics); then every
        rank's examples' rows move towards their new projections."""
        rows = torch.cat([ids.unsqueeze(1), negatives.to(ids.device)], dim=1)
        scores = [
            torch.exp(torch.einsum("bd,bkd->bk", anchors, memory[rows].detach()) / self.tau)
            for anchors, memory in ((student, self.teacher_rows), (teacher, self.student_rows))
        ]
        estimate = torch.stack([s.detach().mean() * len(self.student_rows) for s in scores])  # CRD's Z from the first batch,
        self.normalisers.copy_(torch.where(self.normalisers < 0, estimate, self.normalisers))  # kept after (no host sync)
        noise = 1 / len(self.student_rows)
        loss = binary_nce(scores[0] / self.normalisers[0], noise) + binary_nce(scores[1] / self.normalisers[1], noise)
        self._update(ids, student.detach(), teacher.detach())
        return loss, torch.log(scores[0].detach()).float()

    @torch.no_grad()
    def _update(self, ids: torch.Tensor, student: torch.Tensor, teacher: torch.Tensor) -> None:
        ids = all_gather_rows(ids)[0]
        for memory, new in ((self.student_rows, student), (self.teacher_rows, teacher)):
            memory[ids] = F.normalize(self.momentum * memory[ids] + (1 - self.momentum) * all_gather_rows(new)[0].to(memory.dtype), dim=-1)
