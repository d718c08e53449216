"""codir-ds's own checkpoint state without pickles: the structure as JSON, its tensors as safetensors.

Reading either file runs no code, so a checkpoint from an untrusted source cannot execute anything through
codir-ds (DeepSpeed's own engine files are still pickles: see the README).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..runtime.errors import CodirError, error_line

TENSOR = "__tensor__"  # a JSON placeholder {"__tensor__": key} for a tensor stored in the safetensors file


def save_state(state: dict[str, Any], stem: Path) -> None:
    """Write `state` (nested dicts/lists of numbers, strings, None and tensors) as `<stem>.json` + `<stem>.safetensors`."""
    tensors: dict[str, torch.Tensor] = {}

    def encode(value: Any, key: str) -> Any:
        if isinstance(value, torch.Tensor):
            tensors[key] = value.detach().cpu().contiguous().clone()
            return {TENSOR: key}
        if isinstance(value, dict):
            return {str(k): encode(v, f"{key}.{k}") for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [encode(v, f"{key}.{i}") for i, v in enumerate(value)]
        if isinstance(value, np.ndarray):
            return value.tolist()
        if isinstance(value, np.generic):
            return value.item()
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        raise TypeError(f"checkpoint state: cannot store {type(value).__name__} at {key}")

    structure = encode(state, "state")
    save_file(tensors, str(stem.with_suffix(".safetensors")))
    stem.with_suffix(".json").write_text(json.dumps(structure))


def load_state(stem: Path) -> dict[str, Any]:
    """Read what `save_state` wrote (tuples come back as lists); `CodirError` if either file is missing or damaged."""
    structure = _read(stem.with_suffix(".json"), lambda path: json.loads(path.read_text()))
    tensors = _read(stem.with_suffix(".safetensors"), lambda path: load_file(str(path)))

    def decode(value: Any) -> Any:
        if isinstance(value, dict):
            if set(value) == {TENSOR}:
                return tensors[value[TENSOR]]
            return {k: decode(v) for k, v in value.items()}
        if isinstance(value, list):
            return [decode(v) for v in value]
        return value

    try:
        return decode(structure)
    except KeyError as err:
        raise CodirError(f"corrupt checkpoint {stem.parent}: {stem.name}: tensor {err} is missing") from None


def _read(path: Path, read: Callable[[Path], Any]) -> Any:
    try:
        return read(path)
    except Exception as err:  # missing, truncated, not JSON / safetensors (safetensors has its own error type)
        raise CodirError(f"corrupt checkpoint {path.parent}: {path.name}: {type(err).__name__}: {error_line(err, limit=160)}") from None
