"""Elastic resume: load a ZeRO-1/2/3 checkpoint written by N ranks on M ranks via DeepSpeed's universal checkpoint.

On a resume whose world size differs from the checkpoint's, `universal_conversion` has rank 0 convert the
checkpoint (`convert_to_universal`), the engine is built from `universal_ds_config`, and `checkpoint.load_checkpoint`
then restores it with `load_universal`. codir-ds's own state (`rank_*.json/.safetensors`) stays in `<dir>/<tag>`: the data
position and queue are the same on every rank, so rank 0's serves any world size.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import shutil
from pathlib import Path

import torch

from ..runtime import files
from ..runtime.distributed import print0, rank0_first, world_size
from ..runtime.errors import CodirError, error_line

UNIVERSAL_SUFFIX = "_universal"
LATEST_UNIVERSAL = "latest_universal"  # written by DeepSpeed's converter next to its output folder
SOURCE = "codir_source.txt"  # fingerprint of the converted checkpoint, to detect a stale conversion


def universal_tag(tag: str) -> str:
    """The tag of the universal checkpoint converted from `tag`."""
    return f"{tag}{UNIVERSAL_SUFFIX}"


def checkpoint_zero_stage(folder: Path) -> int:
    """The ZeRO stage a DeepSpeed checkpoint folder was written with (0 when it has no ZeRO optimizer files)."""
    optim = sorted(folder.glob("*_optim_states.pt"))
    if not optim:
        return 0
    state = torch.load(optim[0], map_location="cpu", weights_only=False)
    return int(state.get("optimizer_state_dict", {}).get("zero_stage", 1))


def _fingerprint(folder: Path) -> str:
    """Name, size and mtime of the DeepSpeed state files in `folder` (a re-saved tag gets a new fingerprint)."""
    files = sorted(folder.glob("*_states.pt"))
    return "".join(f"{f.name} {f.stat().st_size} {f.stat().st_mtime_ns}\n" for f in files)


def convert_to_universal(checkpoint_dir: Path, tag: str, workers: int = 1) -> str:
    """Convert `<checkpoint_dir>/<tag>` into `<checkpoint_dir>/<tag>_universal` and return that tag; one process only.

    Written into `<tag>_universal.partial/` and renamed when complete; an existing `<tag>_universal/` is reused
    when it was converted from the current `<tag>/` (a re-saved tag, e.g. `best`, is converted again).
    Stage 0 checkpoints hold whole, unpartitioned state and need no conversion: they are refused here.
    """
    checkpoint_dir = Path(checkpoint_dir)
    source = checkpoint_dir / tag
    target_tag = universal_tag(tag)
    final = checkpoint_dir / target_tag
    if not source.is_dir():
        raise CodirError(f"universal checkpoint: no checkpoint {source}")
    fingerprint = _fingerprint(source)
    marker = final / SOURCE
    if final.is_dir():
        if marker.is_file() and marker.read_text() == fingerprint:
            return target_tag
        shutil.rmtree(final)
    try:
        stage = checkpoint_zero_stage(source)
    except Exception as err:
        raise CodirError(f"universal checkpoint: cannot read {source}: {type(err).__name__}: {error_line(err, limit=200)}") from None
    if stage == 0:
        raise CodirError(
            f"universal checkpoint: {source} was written without ZeRO (stage 0); "
            "DeepSpeed converts only ZeRO stage 1-3 checkpoints (stage 0 loads on any world size as is)"
        )
    partial = checkpoint_dir / f"{target_tag}{files.PARTIAL}"
    if partial.exists():
        shutil.rmtree(partial)
    latest = checkpoint_dir / LATEST_UNIVERSAL
    previous_latest = latest.read_text() if latest.is_file() else None
    from deepspeed.checkpoint import ds_to_universal

    args = argparse.Namespace(
        input_folder=str(source),
        output_folder=str(partial),
        num_extract_workers=workers,
        num_merge_workers=workers,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=True,
    )  # plain modules carry no universal_checkpoint_info
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):  # its prints and progress bars
            ds_to_universal.main(args)
    except Exception as err:
        shutil.rmtree(partial, ignore_errors=True)
        raise CodirError(
            f"universal checkpoint: cannot convert {source} (ZeRO stage {stage}): {type(err).__name__}: {error_line(err, limit=200)}"
        ) from None
    finally:  # the converter points latest_universal at its output folder, here the .partial one
        if previous_latest is None:
            latest.unlink(missing_ok=True)
        else:
            latest.write_text(previous_latest)
    (partial / SOURCE).write_text(fingerprint)
    files.publish(partial, final)
    return target_tag


def universal_ds_config(ds_config: dict) -> dict:
    """A copy of `ds_config` whose engine loads universal checkpoints (`checkpoint.load_universal`)."""
    config = copy.deepcopy(ds_config)
    config["checkpoint"] = {**config.get("checkpoint", {}), "load_universal": True}
    return config


def load_universal(engine, checkpoint_dir: Path, tag: str):
    """Restore weights, optimizer, lr scheduler and step counters of `engine` from universal checkpoint `tag`;
    returns what `engine.load_checkpoint` returns. The engine must have been built from `universal_ds_config(...)`."""
    folder = Path(checkpoint_dir) / tag
    if not (folder / "zero").is_dir():
        raise CodirError(f"universal checkpoint: no {folder}/zero (convert it first with convert_to_universal)")
    if not engine.load_universal_checkpoint():
        raise CodirError(f"universal checkpoint {folder}: the engine was not built with checkpoint.load_universal")
    return engine.load_checkpoint(str(checkpoint_dir), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True)


def universal_conversion(checkpoint_dir: Path, tag: str, written_by: int) -> str | None:
    """For a resume on another world size than the `written_by` ranks that saved `tag`: rank 0 converts a ZeRO
    checkpoint to a universal one (every rank learns whether that worked); returns its tag, or None for a stage-0
    checkpoint, which DeepSpeed loads on any world size as it is."""
    if checkpoint_zero_stage(Path(checkpoint_dir) / tag) == 0:
        return None
    print0(f"codir-ds: {tag} was written by {written_by} ranks, this run has {world_size()}: converting it to a universal checkpoint")
    rank0_first(lambda: convert_to_universal(Path(checkpoint_dir), tag))
    return universal_tag(tag)
