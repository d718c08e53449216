"""The negative queue: a fixed-length FIFO of pre-projection teacher features (with labels and example ids)."""

from __future__ import annotations

import torch

from ..runtime.errors import CodirError


class NegativeQueue:
    """FIFO of the K most recent teacher features.

    Features are stored before projection: the teacher is frozen, so a stored row never goes stale
    and re-projecting it with the current teacher head gives exact negatives. Every rank enqueues the
    same all-gathered rows, so every rank holds the same queue.
    """

    def __init__(self, length: int, dim: int, device: torch.device | str = "cpu", dtype=torch.float32):
        if length < 0:
            raise CodirError(f"queue length {length} must be >= 0")
        self.length = length
        self.features = torch.zeros(length, dim, device=device, dtype=dtype)
        self.labels = torch.full((length,), -1, dtype=torch.long, device=device)
        self.ids = torch.full((length,), -1, dtype=torch.long, device=device)  # the example each row came from
        self.pointer = 0  # next row to overwrite
        self.filled = 0

    @torch.no_grad()
    def enqueue(self, features: torch.Tensor, labels: torch.Tensor | None = None, ids: torch.Tensor | None = None) -> None:
        """Append rows in order, dropping the oldest; more rows than K keeps only the last K. Labels and example
        ids default to -1 (none)."""
        if self.length == 0 or len(features) == 0:
            return
        none = torch.full((len(features),), -1, dtype=torch.long, device=features.device)
        labels, ids = none if labels is None else labels, none if ids is None else ids
        features, labels, ids = features[-self.length :], labels[-self.length :], ids[-self.length :]
        rows = (self.pointer + torch.arange(len(features), device=self.features.device)) % self.length
        self.features[rows] = features.to(self.features)
        self.labels[rows] = labels.to(self.labels)
        self.ids[rows] = ids.to(self.ids)
        self.pointer = (self.pointer + len(features)) % self.length
        self.filled = min(self.length, self.filled + len(features))

    def stored(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Stored (features, labels, ids) in storage order, without a copy: what the loss needs."""
        return self.features[: self.filled], self.labels[: self.filled], self.ids[: self.filled]

    def contents(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Stored (features, labels, ids), oldest first."""
        if self.filled < self.length:
            return self.stored()
        order = torch.roll(torch.arange(self.length, device=self.features.device), -self.pointer)
        return self.features[order], self.labels[order], self.ids[order]

    @property
    def fill_fraction(self) -> float:
        return self.filled / self.length if self.length else 1.0

    def state_dict(self) -> dict:
        return {"features": self.features.cpu(), "labels": self.labels.cpu(), "ids": self.ids.cpu(), "pointer": self.pointer, "filled": self.filled}

    def load_state_dict(self, state: dict) -> None:
        if tuple(state["features"].shape) != tuple(self.features.shape):
            raise CodirError(
                f"saved queue has shape {tuple(state['features'].shape)}, this run expects "
                f"{tuple(self.features.shape)} (codir.queue_length or the layer map changed)"
            )
        self.features.copy_(state["features"])
        self.labels.copy_(state["labels"])
        self.ids.copy_(state["ids"])
        self.pointer, self.filled = int(state["pointer"]), int(state["filled"])
