"""Random streams: the shared seed, each rank's own stream, and their state as checkpoints save it."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
from deepspeed.accelerator import get_accelerator


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def seed_rank(seed: int, rank: int) -> None:
    """Give each rank its own random stream (dropout) after the models are built from the shared seed."""
    per_rank = seed + 1_000_003 * (rank + 1)
    torch.manual_seed(per_rank)
    get_accelerator().manual_seed_all(per_rank)


def rng_state() -> dict[str, Any]:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "accelerator": get_accelerator().get_rng_state(),
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of `rng_state`, also from its JSON form (lists where it had tuples)."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), position, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    get_accelerator().set_rng_state(state["accelerator"])
