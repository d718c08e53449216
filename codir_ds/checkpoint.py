"""Atomic, resumable checkpoints: DeepSpeed engine state plus each rank's own state (data, queue, RNG).

A checkpoint is written into `<tag>.partial/` and becomes visible only when rank 0 renames it to
`<tag>/` and then atomically replaces the `latest` file: a crash mid-save leaves the previous one usable.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from deepspeed.accelerator import get_accelerator

from .distributed import barrier, rank, world_size
from .errors import CodirError, error_line
from .universal import load_universal, universal_tag

LATEST = "latest"
PARTIAL = ".partial"


def save_checkpoint(engine, directory: Path, step: int, rank_state: dict[str, Any], keep: int, tag: str | None = None) -> str:
    """Save engine + per-rank state as `step_<step>`, atomically; keep the newest `keep` checkpoints.

    A named `tag` (e.g. `best`) replaces its earlier version and leaves `latest` and pruning alone.
    """
    periodic = tag is None
    tag = tag or f"step_{step}"
    partial = directory / f"{tag}{PARTIAL}"
    if rank() == 0:
        for debris in directory.glob(f"*{PARTIAL}"):  # left by a crash during an earlier save
            shutil.rmtree(debris)
    barrier()
    engine.save_checkpoint(str(directory), tag=partial.name, save_latest=False)
    _atomic_torch_save({**rank_state, "step": step, "rng": rng_state()}, partial / f"rank_{rank()}.pt")
    barrier()
    if rank() == 0:
        final = directory / tag
        if final.exists():
            shutil.rmtree(final)
        os.replace(partial, final)
        if periodic:
            _atomic_write_text(directory / LATEST, tag)
            _prune(directory, keep)
    barrier()
    return tag


def resolve_resume_tag(directory: Path, resume: str) -> str | None:
    """The tag to resume from: `latest` (None when the run is new), a tag, or '' for a fresh start."""
    if not resume:
        return None
    if resume == LATEST:
        latest = directory / LATEST
        return latest.read_text().strip() if latest.is_file() else None
    if not (directory / resume).is_dir():
        available = [p.name for p in _complete_checkpoints(directory)]
        raise CodirError(f"checkpoint.resume: no checkpoint {resume!r} in {directory} (available: {available or 'none'})")
    return resume


@dataclass
class Resume:
    """The checkpoint a run resumes from: its tag, how many ranks wrote it, and, when this run has another world
    size, the tag of its universal conversion (ZeRO 1-3; a stage-0 checkpoint loads on any world size as it is)."""

    tag: str
    world: int
    universal_tag: str | None = None

    @property
    def elastic(self) -> bool:
        return self.world != world_size()

    def require_same_world(self, folder: Path) -> None:
        """For state that cannot move to another world size: fail unless this run has the writer's ranks."""
        if self.elastic:
            raise CodirError(
                f"checkpoint {folder / self.tag} was written by {self.world} ranks, this run has {world_size()}: "
                f"resume with {self.world} ranks, or export it and start a new run from the export "
                f"(student.init=checkpoint)"
            )


def find_resume(directory: Path, resume: str) -> Resume | None:
    """What `checkpoint.resume` names (None for a fresh start), read from the files before any engine is built."""
    tag = resolve_resume_tag(directory, resume)
    return Resume(tag, len(list((directory / tag).glob("rank_*.pt")))) if tag else None


def load_checkpoint(engine, directory: Path, resume: Resume, elastic: bool = False) -> dict[str, Any]:
    """Restore engine state and return the saved rank state: this rank's (RNG restored already) or, on another
    world size (`elastic` stages only), rank 0's, whose data position and queue every rank shares."""
    folder = directory / resume.tag
    if not elastic:
        resume.require_same_world(directory)
    rank_file = folder / f"rank_{0 if resume.elastic else rank()}.pt"
    try:
        if resume.universal_tag:
            path, _ = load_universal(engine, directory, resume.universal_tag)
        else:
            path, _ = engine.load_checkpoint(str(directory), tag=resume.tag)
        state = torch.load(rank_file, map_location="cpu", weights_only=False)
    except CodirError:
        raise
    except Exception as err:
        raise CodirError(f"corrupt checkpoint {folder}: {type(err).__name__}: {error_line(err, limit=200)}") from None
    if path is None:
        raise CodirError(f"corrupt checkpoint {folder}: DeepSpeed found no model state in it")
    if not resume.elastic:
        restore_rng_state(state["rng"])
    return state


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
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    get_accelerator().set_rng_state(state["accelerator"])


def _complete_checkpoints(directory: Path) -> list[Path]:
    """Finished `step_N` folders, oldest first (not their `.partial` or universal conversions)."""
    folders = (p for p in directory.glob("step_*") if p.is_dir() and re.fullmatch(r"step_\d+", p.name))
    return sorted(folders, key=lambda p: int(p.name.split("_")[1]))


def _prune(directory: Path, keep: int) -> None:
    for old in _complete_checkpoints(directory)[:-keep]:
        shutil.rmtree(old)
        shutil.rmtree(old.with_name(universal_tag(old.name)), ignore_errors=True)


def _atomic_torch_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
