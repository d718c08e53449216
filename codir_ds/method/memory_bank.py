"""The stage-2 memory bank: the frozen teacher's features and logits for every training example, and
label-aware negative sampling from it."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..runtime.errors import CodirError


class MemoryBank:
    """Teacher features [N, F] and logits [N, C] indexed by training-example id, with each example's label.

    The teacher is frozen, so a row computed once never goes stale: later epochs read the teacher's
    outputs from here instead of running it.
    """

    def __init__(self, features: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, regression: bool):
        self.features, self.logits, self.labels, self.regression = features, logits, labels, regression
        if regression:
            if len(labels) < 2:
                raise CodirError("task: the memory bank needs at least two training examples")
            return
        # other[label, j]: the j-th row of another label (padded), others[label]: how many there are; on the device
        ids = labels.unique().tolist()
        rows = [torch.nonzero(labels != label).squeeze(1) for label in range(max(ids) + 1)]
        for label in ids:
            if len(rows[label]) == 0:
                raise CodirError(f"task: every training example has label id {label}; label-aware negatives need two labels")
        self.other = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True).to(features.device)
        self.others = torch.tensor([len(r) for r in rows], device=features.device)

    def __len__(self) -> int:
        return len(self.features)

    def sample_negatives(self, idx: torch.Tensor, labels: torch.Tensor | None, count: int, generator: torch.Generator) -> torch.Tensor:
        """Bank rows [batch, count] to contrast each anchor against, drawn uniformly with replacement on the bank's
        device by `generator` (of that device; no host sync): rows of a different label for classification, any row
        but the anchor's own for regression."""
        device = self.features.device
        if self.regression:
            draws = torch.randint(len(self) - 1, (len(idx), count), generator=generator, device=device)
            return draws + (draws >= idx.to(device).unsqueeze(1)).long()  # skip the anchor's own row
        labels = labels.to(device)
        uniform = torch.rand(len(idx), count, generator=generator, device=device)
        draws = (uniform * self.others[labels].unsqueeze(1)).long()  # in [0, others of the anchor's label)
        return self.other[labels.unsqueeze(1), draws]

    @property
    def nbytes(self) -> int:
        return self.features.nbytes + self.logits.nbytes


@torch.no_grad()
def fill_memory_bank(
    teacher: Callable[[dict[str, torch.Tensor]], tuple[torch.Tensor, torch.Tensor]],
    batches,
    size: int,
    gather: Callable[[torch.Tensor], torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run `teacher` once over every training example and return (features, logits) in example order.

    `batches` yields (batch, real rows) for this rank (see `padded_shards`); `gather` concatenates every
    rank's rows, so each rank ends with the whole bank.
    """
    features = logits = None
    for batch, real in batches:
        batch_features, batch_logits = teacher(batch)
        if features is None:
            features = batch_features.new_zeros(size, batch_features.shape[1], dtype=torch.float32)
            logits = batch_logits.new_zeros(size, batch_logits.shape[1], dtype=torch.float32)
        ids = gather(batch["idx"][:real].to(features.device))
        rows = gather(torch.cat([batch_features[:real].float(), batch_logits[:real].float()], dim=1))
        features[ids], logits[ids] = rows[:, : features.shape[1]], rows[:, features.shape[1] :]
    return features, logits
