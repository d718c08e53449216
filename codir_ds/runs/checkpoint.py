"""Atomic, durable, resumable checkpoints: DeepSpeed engine state plus each rank's own state (data, queue, RNG).

A checkpoint is written into `<tag>.partial/`, flushed to disk, and becomes visible only when rank 0 renames it
to `<tag>/` and then atomically replaces the `latest` file: a crash or power loss mid-save leaves the previous
one usable. codir-ds's own state is JSON + safetensors (`state_files`): loading it runs no code.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..runtime import files
from ..runtime.distributed import any_rank, barrier, device, rank, world_size
from ..runtime.errors import CodirError, error_line
from ..runtime.seeding import restore_rng_state, rng_state
from .state_files import load_state, save_state
from .universal import load_universal, universal_conversion, universal_tag

LATEST = "latest"
PARTIAL = files.PARTIAL
TAG = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")  # a checkpoint name: one folder inside the checkpoint folder


def save_checkpoint(engine, directory: Path, step: int, rank_state: dict[str, Any], keep: int, tag: str | None = None) -> str:
    """Save engine + per-rank state as `step_<step>`, atomically; keep the newest `keep` checkpoints.

    A named `tag` (e.g. `best`) replaces its earlier version and leaves `latest` and pruning alone. A failed
    write (a full disk) raises `CodirError` on every rank and leaves `latest` on the previous checkpoint.
    """
    periodic = tag is None
    tag = tag or f"step_{step}"
    partial = directory / f"{tag}{PARTIAL}"
    if rank() == 0:
        for debris in directory.glob(f"*{PARTIAL}"):  # left by a crash during an earlier save
            shutil.rmtree(debris)
    barrier()
    failure = None
    try:
        engine.save_checkpoint(str(directory), tag=partial.name, save_latest=False)
        save_state({**rank_state, "step": step, "rng": rng_state()}, partial / f"rank_{rank()}")
    except Exception as err:  # a full disk surfaces as OSError or as RuntimeError from torch's writer
        failure = f"{type(err).__name__}: {error_line(err, limit=160)}"
    if any_rank(failure is not None, device()):
        if rank() == 0:
            shutil.rmtree(partial, ignore_errors=True)
        previous = latest_tag(directory) if periodic else None
        raise CodirError(
            f"checkpoint {tag} could not be written to {directory} ({failure or 'failed on another rank'}); "
            + (f"'latest' still names {previous}; " if previous else "")
            + "free disk space and run the same command again to resume"
        )
    if rank() == 0:
        files.publish(partial, directory / tag)
        if periodic:
            files.write_text(directory / LATEST, tag)
            _prune(directory, keep, protect=tag)
    barrier()
    return tag


def resolve_resume_tag(directory: Path, resume: str) -> str | None:
    """The tag to resume from: `latest` (None when the run is new), a tag, or '' for a fresh start."""
    if not resume:
        return None
    if resume == LATEST:
        latest = directory / LATEST
        if not latest.is_file():
            return None
        tag = _read_latest(directory)
        if not TAG.fullmatch(tag):
            raise CodirError(f"{latest} does not name a checkpoint (it holds {tag[:40]!r}){_advice(directory)}")
        if not (directory / tag).is_dir():
            raise CodirError(f"{latest} names {tag}, which is not in {directory}{_advice(directory)}")
        return tag
    if not TAG.fullmatch(resume):
        raise CodirError(f"checkpoint.resume: {resume!r} is not a checkpoint name (a folder of {directory}, e.g. step_500)")
    if not (directory / resume).is_dir():
        available = [p.name for p in complete_checkpoints(directory)]
        raise CodirError(f"checkpoint.resume: no checkpoint {resume!r} in {directory} (available: {available or 'none'})")
    return resume


@dataclass(frozen=True)
class Resume:
    """The checkpoint a run resumes from: its tag, how many ranks wrote it, its step, and, when this run has another
    world size, the tag of its universal conversion (ZeRO 1-3; a stage-0 checkpoint loads on any world size as it is)."""

    tag: str
    world: int
    step: int
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


def find_resume(directory: Path, resume: str, convert: bool = False) -> Resume | None:
    """What `checkpoint.resume` names (None for a fresh start), read from the files before any engine is built.
    With `convert`, a checkpoint of another world size is converted to a universal one (every rank calls it)."""
    tag = resolve_resume_tag(directory, resume)
    if tag is None:
        return None
    folder = directory / tag
    if list(folder.glob("rank_*.pt")):
        raise CodirError(
            f"checkpoint {folder} was written by an earlier codir-ds (pickled rank_*.pt, which is no longer loaded: "
            f"a pickle can run code); export it with `codir-ds export` and start a new run from the export (student.init=checkpoint)"
        )
    world = len(list(folder.glob("rank_*.json")))
    missing = [
        f"rank_{r}" for r in range(max(world, 1)) if not (folder / f"rank_{r}.json").is_file() or not (folder / f"rank_{r}.safetensors").is_file()
    ]
    if missing:
        raise CodirError(f"checkpoint {folder} is incomplete (no {missing[0]}.json/.safetensors){_advice(directory, exclude=tag)}")
    try:
        step = int(json.loads((folder / "rank_0.json").read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CodirError(
            f"corrupt checkpoint {folder}: rank_0.json: {type(err).__name__}: {error_line(err, limit=120)}{_advice(directory, exclude=tag)}"
        ) from None
    elastic = world != world_size()
    return Resume(tag, world, step, universal_conversion(directory, tag, world) if convert and elastic else None)


def load_checkpoint(engine, directory: Path, resume: Resume, elastic: bool = False) -> dict[str, Any]:
    """Restore engine state and return the saved rank state: this rank's (RNG restored already) or, on another
    world size (`elastic` stages only), rank 0's, whose data position and queue every rank shares."""
    folder = directory / resume.tag
    if not elastic:
        resume.require_same_world(directory)
    try:
        state = load_state(folder / f"rank_{0 if resume.elastic else rank()}")
    except CodirError as err:  # a damaged state file: say what to resume from instead
        raise CodirError(f"{err}{_advice(directory, exclude=resume.tag)}") from None
    try:
        if resume.universal_tag:
            path, _ = load_universal(engine, directory, resume.universal_tag)
        else:
            path, _ = engine.load_checkpoint(str(directory), tag=resume.tag)
    except CodirError:
        raise
    except Exception as err:
        if "size mismatch" in str(err):
            raise CodirError(
                f"checkpoint {folder} holds a model of other shapes than this run builds ({error_line(err, index=1, limit=160)}); "
                f"resume with the model settings it was written with{_advice(directory, exclude=resume.tag)}"
            ) from None
        raise CodirError(
            f"corrupt checkpoint {folder}: {type(err).__name__}: {error_line(err, limit=200)}{_advice(directory, exclude=resume.tag)}"
        ) from None
    if path is None:
        raise CodirError(f"corrupt checkpoint {folder}: DeepSpeed found no model state in it{_advice(directory, exclude=resume.tag)}")
    if not resume.elastic:
        restore_rng_state(state["rng"])
    return state


def holds_checkpoints(directory: Path) -> bool:
    """Whether `directory` holds a `latest` file or any checkpoint (complete or not, of any codir-ds version)."""
    if not directory.is_dir():
        return False
    folders = (p for p in directory.iterdir() if p.is_dir() and not p.name.endswith(PARTIAL))
    return (directory / LATEST).exists() or any((p / "rank_0.json").exists() or (p / "rank_0.pt").exists() for p in folders)


def complete_checkpoints(directory: Path) -> list[Path]:
    """Finished `step_N` folders holding rank 0's state, oldest first (not `.partial` or universal conversions)."""
    folders = (p for p in directory.glob("step_*") if re.fullmatch(r"step_\d+", p.name) and (p / "rank_0.json").is_file())
    return sorted(folders, key=lambda p: int(p.name.split("_")[1]))


def latest_tag(directory: Path) -> str | None:
    """What the `latest` file names, or None when there is none."""
    return _read_latest(directory) if (directory / LATEST).is_file() else None


def _read_latest(directory: Path) -> str:
    return (directory / LATEST).read_bytes().decode("utf-8", errors="replace").strip()


def _advice(directory: Path, exclude: str | None = None) -> str:
    """What to resume from instead: the newest complete checkpoint other than `exclude`."""
    others = [p.name for p in complete_checkpoints(directory) if p.name != exclude]
    if others:
        return f"; resume from {others[-1]}, the newest complete checkpoint, with --checkpoint.resume={others[-1]}"
    return "; no other complete checkpoint is there: start again with --checkpoint.resume= --output.overwrite=true"


def _prune(directory: Path, keep: int, protect: str) -> None:
    """Delete the oldest complete `step_N` checkpoints beyond `keep`, never `protect` (the one just written, which
    `latest` names) nor one numbered above it (left by a run resumed from an earlier tag)."""
    limit = int(protect.split("_")[1])
    older = [p for p in complete_checkpoints(directory) if int(p.name.split("_")[1]) < limit]
    for old in older[: max(0, len(older) - (keep - 1))]:
        shutil.rmtree(old)
        shutil.rmtree(old.with_name(universal_tag(old.name)), ignore_errors=True)
