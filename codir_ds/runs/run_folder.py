"""A run's folder: one run at a time (a lock), and what was trained there (its identity).

The first start of a run records, in `<checkpoint dir>/run.json`, every setting that decides what is trained
(models, layer map, data, loss, shapes, seeds; not the step budget, logging or checkpoint cadence). A resume
with other settings stops with the keys that differ; a fresh start over another run's checkpoints refuses
unless `output.overwrite` asks for it, and then moves the old run aside rather than deleting it.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from ..runtime import files
from .checkpoint import Resume, find_resume, holds_checkpoints
from ..runtime.config import config_to_dict
from ..runtime.distributed import print0, rank0_first
from ..runtime.errors import CodirError

RUN_FILE = "run.json"
LOCK_FILE = "codir.lock"
UNREADABLE_LOCK_SECONDS = 60  # an empty or garbled lock older than this is a crashed writer's
NOT_IDENTITY = (  # settings that do not change what is trained (dotted keys, or section prefixes ending in ".")
    "train.max_steps",
    "train.epochs",
    "train.micro_batch_size",  # these three enter as their product, train.global_batch
    "train.gradient_accumulation_steps",
    "train.deepspeed_config",  # enters as its content: see `deepspeed_identity`
    "train.comm_timeout_minutes",
    "train.compile",
    "teacher.zero3",
    "data.num_workers",
    "data.prepare_processes",
    "data.prepared",  # the corpus enters as its content: data.corpus
    "data.files",
    "data.dataset",
    "data.dataset_config",
    "data.split",
    "data.text_column",
    "data.eval_prepared",  # evaluation only: what is trained is the same
    "logging.",
    "checkpoint.",
    "output.",
    "eval.",
)
MODEL_KEYS = ("teacher.path", "student.checkpoint", "student.config_path")  # enter as digests of their files
MODEL_FILES = ("config.json", "*.safetensors", "*.bin", "*.pt", "*.model", "vocab*", "tokenizer*", "merges.txt")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")
SAMPLE_BLOCKS, SAMPLE_BLOCK_BYTES = 64, 64 * 2**10  # a weight file enters the identity through 4 MiB of its content
SAFETENSORS_HEADER_LIMIT = 100 * 2**20  # the largest header the safetensors format allows


class RunLock:
    """An exclusive lock on a run folder: `codir.lock` created with O_EXCL (atomic on local and NFS v3+ / Lustre /
    GPFS filesystems), holding the holder's host, pid and SLURM job. Held by rank 0 for the run's life."""

    def __init__(self, folder: Path):
        self.path = Path(folder) / LOCK_FILE
        self.held = False

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = _holder()
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._read()
                if not self._stale(holder, me):
                    raise CodirError(
                        f"output.dir {self.path.parent} is in use by another run ({_describe(holder)}, lock {self.path}); "
                        f"wait for it or choose another --output.dir (delete the lock only if that run is gone)"
                    ) from None
                print0(f"codir-ds: notice: taking over the lock of a run that is gone ({_describe(holder)})")
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as handle:
                handle.write(json.dumps(me))
                handle.flush()
                os.fsync(handle.fileno())
            self.held = True
            return

    def release(self) -> None:
        if self.held and self._read().get("pid") == os.getpid():
            self.path.unlink(missing_ok=True)
        self.held = False

    def _read(self) -> dict[str, Any]:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}

    def _stale(self, holder: dict[str, Any], me: dict[str, Any]) -> bool:
        """A dead process of this host, or an earlier start of this SLURM job (requeued), holds no folder."""
        if not holder:  # unreadable: being written right now, or left by a crash while it was written
            return time.time() - self.path.stat().st_mtime > UNREADABLE_LOCK_SECONDS if self.path.exists() else True
        if holder.get("slurm_job") and holder.get("slurm_job") == me["slurm_job"]:
            return True
        if holder.get("host") != me["host"] or not isinstance(holder.get("pid"), int):
            return False  # another host's process cannot be checked from here
        try:
            os.kill(holder["pid"], 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False


def hold_run_folder(folder: Path) -> RunLock:
    """Take the run folder's lock on rank 0 (every rank fails if it is held); a context manager that releases it."""
    lock = RunLock(folder)
    rank0_first(lock.acquire)  # runs on rank 0 only
    return lock


def run_started_ns(folder: Path) -> int:
    """When the run holding `folder` started: its lock's st_mtime_ns, on the clock of the file system that holds the
    stop file by default (the present where the lock is not visible: only rank 0, which holds it, reads the stop file)."""
    try:
        return (Path(folder) / LOCK_FILE).stat().st_mtime_ns
    except FileNotFoundError:
        return time.time_ns()


def open_checkpoints(cfg, identity: dict[str, Any], elastic: bool) -> Resume | None:
    """The checkpoint to resume from, after checking it was written by a run of the same `identity`, on this
    world size unless `elastic` (then converted to a universal checkpoint where it needs it), and is not past
    `train.max_steps`; for a fresh start, the folder is made free
    (another run's checkpoints moved aside with `output.overwrite`, else refused) and the identity recorded."""
    directory = cfg.checkpoint_dir

    def check() -> None:
        directory.mkdir(parents=True, exist_ok=True)
        files.recover(directory)
        resume = find_resume(directory, cfg.checkpoint.resume)
        if resume is not None:
            if not elastic:
                resume.require_same_world(directory)
            _require_same_identity(directory, identity, resume)
            if resume.step > cfg.train.max_steps:
                raise CodirError(
                    f"{resume.tag} in {directory} is at step {resume.step}, beyond train.max_steps={cfg.train.max_steps}: "
                    f"raise train.max_steps to train on, or resume from an earlier checkpoint"
                )
            return
        if holds_checkpoints(directory):
            if not cfg.output.overwrite:
                raise CodirError(
                    f"{directory} holds another run's checkpoints and checkpoint.resume is {cfg.checkpoint.resume!r}: "
                    f"resume it (--checkpoint.resume=latest), choose another --output.dir, or pass --output.overwrite=true "
                    f"to move it aside and start fresh"
                )
            _move_aside([directory, cfg.tensorboard_dir, cfg.export_dir])
            directory.mkdir(parents=True)
        record = {"identity": identity, "config": config_to_dict(cfg), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        files.write_text(directory / RUN_FILE, json.dumps(record, indent=1))

    rank0_first(check)
    return find_resume(directory, cfg.checkpoint.resume, convert=elastic)


def first_start_setting(cfg, section: str, key: str) -> Any:
    """What the run that `cfg` resumes recorded for `section.key` at its first start; None when it starts fresh."""
    path = cfg.checkpoint_dir / RUN_FILE
    if not cfg.checkpoint.resume or not holds_checkpoints(cfg.checkpoint_dir) or not path.is_file():
        return None
    try:
        return json.loads(path.read_text())["config"][section][key]
    except (OSError, ValueError, KeyError, TypeError):
        return None  # an unreadable record is reported where the run's identity is checked


def run_identity(cfg, ds_config: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """The settings that decide what `cfg` trains, as {dotted key: value}: its keys but those in `NOT_IDENTITY`,
    model folders as digests, the global batch, the DeepSpeed config's optimizer, schedule and precision, and
    `extra` (derived values such as the layer map and the corpus)."""
    flat = _flatten(config_to_dict(cfg))
    kept = {k: v for k, v in flat.items() if not any(k == x or (x.endswith(".") and k.startswith(x)) for x in NOT_IDENTITY)}
    models = {k: model_digest(kept[k]) for k in MODEL_KEYS if kept.get(k)}
    return {**kept, **models, "train.global_batch": ds_config["train_batch_size"], **deepspeed_identity(ds_config), **extra}


def model_digest(path: str) -> str:
    """A short digest of a model folder: its config and tokenizer files' contents, and its weight files' sizes and
    contents through `weight_sample` (a path that is not a folder, e.g. a hub name, is its own digest)."""
    folder = Path(path)
    if not folder.is_dir():
        return path
    digest = hashlib.sha256()
    for pattern in MODEL_FILES:
        for file in sorted(folder.glob(pattern)):
            weights = file.suffix in WEIGHT_SUFFIXES
            digest.update(f"{file.name} {file.stat().st_size}\n".encode() + (weight_sample(file) if weights else file.read_bytes()))
    return f"{path} ({digest.hexdigest()[:12]})"


def weight_sample(file: Path) -> bytes:
    """A weight file's content at a bounded cost: the whole file up to `SAMPLE_BLOCKS` blocks, else its safetensors
    header (every tensor's name, dtype, shape and offset) and `SAMPLE_BLOCKS` blocks spread evenly from its first
    byte to its last. Retrained or swapped weights change every block."""
    size = file.stat().st_size
    with file.open("rb") as handle:
        if size <= SAMPLE_BLOCKS * SAMPLE_BLOCK_BYTES:
            return handle.read()
        parts = []
        if file.suffix == ".safetensors":
            parts.append(handle.read(min(int.from_bytes(handle.read(8), "little"), SAFETENSORS_HEADER_LIMIT)))
        for block in range(SAMPLE_BLOCKS):
            handle.seek(block * (size - SAMPLE_BLOCK_BYTES) // (SAMPLE_BLOCKS - 1))
            parts.append(handle.read(SAMPLE_BLOCK_BYTES))
    return b"".join(parts)


def deepspeed_identity(ds_config: dict[str, Any]) -> dict[str, Any]:
    """What in a resolved DeepSpeed config decides training: optimizer, schedule (not its length), precision, clipping."""
    scheduler = json.loads(json.dumps(ds_config.get("scheduler", {})))
    scheduler.get("params", {}).pop("total_num_steps", None)
    return {
        "deepspeed.optimizer": ds_config.get("optimizer"),
        "deepspeed.scheduler": scheduler or None,
        "deepspeed.bf16": bool(ds_config.get("bf16", {}).get("enabled")),
        "deepspeed.fp16": bool(ds_config.get("fp16", {}).get("enabled")),
        "deepspeed.gradient_clipping": ds_config.get("gradient_clipping"),
    }


def _require_same_identity(directory: Path, identity: dict[str, Any], resume: Resume) -> None:
    path = directory / RUN_FILE
    try:
        recorded = json.loads(path.read_text())["identity"]
    except (OSError, ValueError, KeyError) as err:
        raise CodirError(
            f"cannot tell what the run in {directory} trained ({path}: {type(err).__name__}); "
            f"choose another --output.dir, or pass --output.overwrite=true --checkpoint.resume= to move it aside"
        ) from None
    changed = [k for k in sorted(set(recorded) | set(identity)) if _canonical(recorded.get(k)) != _canonical(identity.get(k))]
    if changed:
        shown = "; ".join(f"{k}: {_short(recorded.get(k))} -> {_short(identity.get(k))}" for k in changed[:6])
        raise CodirError(
            f"{resume.tag} in {directory} was trained with other settings ({shown}{'; ...' if len(changed) > 6 else ''}); "
            f"resume with the same settings, choose another --output.dir, or pass --output.overwrite=true --checkpoint.resume= "
            f"to move the old run aside and start fresh"
        )


def _move_aside(paths: list[Path]) -> None:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for path in paths:
        if path.exists():
            target = path.with_name(f"{path.name}.old-{stamp}")
            os.replace(path, target)
            print0(f"codir-ds: output.overwrite: moved {path} aside to {target}")


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _is_digest(value: Any) -> bool:
    """Whether `value` is a `model_digest` of a folder: `<path> (<digest>)`."""
    return isinstance(value, str) and value.endswith(")") and " (" in value


def _canonical(value: Any) -> Any:
    """Model digests compare by content, not by the folder's path."""
    if _is_digest(value):
        return value.rsplit(" (", 1)[1]
    return json.loads(json.dumps(value))  # tuples and lists alike


def _short(value: Any) -> str:
    """At most 60 characters; a model digest keeps its end, where the digest is."""
    text = json.dumps(value) if not isinstance(value, str) else value
    if len(text) <= 60:
        return text
    return "..." + text[-57:] if _is_digest(value) else text[:57] + "..."


def _holder() -> dict[str, Any]:
    since = time.strftime("%Y-%m-%d %H:%M:%S")
    return {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job": os.environ.get("SLURM_JOB_ID", ""), "since": since}


def _describe(holder: dict[str, Any]) -> str:
    if not holder:
        return "unreadable lock"
    job = f", SLURM job {holder['slurm_job']}" if holder.get("slurm_job") else ""
    return f"host {holder.get('host')}, pid {holder.get('pid')}{job}, since {holder.get('since')}"
