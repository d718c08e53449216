"""Export: consolidate a (ZeRO-sharded) checkpoint into a plain Hugging Face student folder with its model card,
written into a temporary folder and renamed into place, readable per the umask."""

from __future__ import annotations

import copy
import glob
import pickle
import re
import shutil
from pathlib import Path

import torch
import transformers
from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils.tensor_fragment import fragment_address
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
from transformers import (
    AutoConfig,
    AutoModelForMaskedLM,
    AutoTokenizer,
    PreTrainedModel,
)

from ..runtime import files
from .checkpoint import LATEST, TAG, latest_tag
from ..runtime.errors import CodirError, error_line
from .model_card import checkpoint_card

STUDENT_SPEC = "student_spec"  # folder beside the checkpoints: the student's config.json and tokenizer
STUDENT_PREFIX = "student."  # parameters under StudentWithHeads.student; heads are dropped
DEEPSPEED_CLASSES = [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]  # pickled in DeepSpeed's own state files


def save_student_spec(directory: Path, student: PreTrainedModel, tokenizer) -> None:
    """Write what export needs besides weights: the student's config (naming its class) and the shared tokenizer."""
    spec = directory / STUDENT_SPEC
    config = copy.deepcopy(student.config)
    config.architectures = [type(student).__name__]
    config.save_pretrained(spec)
    tokenizer.save_pretrained(spec)


def export_student(
    checkpoint_dir: str | Path,
    out_dir: str | Path,
    tag: str | None = None,
    overwrite: bool = False,
    metrics: dict[str, dict[str, float]] | None = None,
) -> Path:
    """Write the student (no projection heads) as safetensors + config + tokenizer + model card (`README.md`, with
    `metrics`, split -> metric -> value, or the dev scores of a stage-2 checkpoint) into `out_dir`, which must not
    exist or be empty unless `overwrite` (then it is replaced whole, atomically)."""
    checkpoint_dir, out_dir = Path(checkpoint_dir), Path(out_dir)
    spec = checkpoint_dir / STUDENT_SPEC
    if not spec.is_dir():
        raise CodirError(f"export: {checkpoint_dir} is not a codir-ds checkpoint folder (no {STUDENT_SPEC}/)")
    if out_dir.exists() and not out_dir.is_dir():
        raise CodirError(f"export: {out_dir} is a file; name a folder to write the student into")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise CodirError(f"export: {out_dir} is not empty; name a new folder, or pass --overwrite=true to replace it")
    tag = _tag(checkpoint_dir, tag)
    state = _consolidated_state(checkpoint_dir, tag)
    student_state = {k[len(STUDENT_PREFIX) :]: v for k, v in state.items() if k.startswith(STUDENT_PREFIX)}
    config = AutoConfig.from_pretrained(spec)
    model_class = getattr(transformers, (config.architectures or [""])[0], None)
    model = model_class(config) if model_class else AutoModelForMaskedLM.from_config(config)
    try:
        model.load_state_dict(student_state, strict=True)
    except RuntimeError as err:
        raise CodirError(
            f"export: checkpoint {checkpoint_dir / tag} does not match its student config: {error_line(err, index=1, limit=200)}"
        ) from None
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    partial = out_dir.with_name(out_dir.name + files.PARTIAL)
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial, safe_serialization=True)
    AutoTokenizer.from_pretrained(spec).save_pretrained(partial)
    (partial / "README.md").write_text(checkpoint_card(checkpoint_dir, tag, model, out_dir.name, metrics))
    files.readable_per_umask(partial)
    files.publish(partial, out_dir)
    return out_dir


def _tag(checkpoint_dir: Path, tag: str | None) -> str:
    """The checkpoint to export: `tag`, or the one `latest` names; a name inside `checkpoint_dir`, nothing else."""
    if tag is None:
        tag = latest_tag(checkpoint_dir)
        if tag is None:
            raise CodirError(f"export: no checkpoint in {checkpoint_dir} (no '{LATEST}' file)")
    if not TAG.fullmatch(tag):
        raise CodirError(f"export: {tag[:40]!r} is not a checkpoint name (a folder of {checkpoint_dir}, e.g. step_500)")
    return tag


def _consolidated_state(checkpoint_dir: Path, tag: str) -> dict[str, torch.Tensor]:
    folder = checkpoint_dir / tag
    if not folder.is_dir():
        raise CodirError(f"export: no checkpoint {tag!r} in {checkpoint_dir}")
    try:
        _require_plain_pickles(folder)
        if glob.glob(str(folder / "*optim_states.pt")):  # ZeRO 1-3 (or bf16) shards: gather fp32 master weights
            return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir), tag=tag)
        model_file = folder / "mp_rank_00_model_states.pt"
        return torch.load(model_file, map_location="cpu", weights_only=True)["module"]
    except CodirError:
        raise
    except Exception as err:
        raise CodirError(f"export: corrupt checkpoint {folder}: {type(err).__name__}: {error_line(err, limit=200)}") from None


def _require_plain_pickles(folder: Path) -> None:
    """Refuse DeepSpeed state files that hold anything but tensors, plain values and DeepSpeed's own state classes
    (a pickle can run code), checked with torch's weights-only unpickler before DeepSpeed's loader opens them."""
    for path in sorted(folder.glob("*_states.pt")):
        try:
            with torch.serialization.safe_globals(DEEPSPEED_CLASSES):
                torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except pickle.UnpicklingError as err:
            named = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
            raise CodirError(
                f"export: {path} would run code when unpickled (it names {named.group(1) if named else error_line(err, limit=120)}, "
                f"neither a tensor nor DeepSpeed's own state); it was not loaded: export only checkpoints you trust"
            ) from None
