"""Export: consolidate a (ZeRO-sharded) checkpoint into a plain Hugging Face student folder."""

from __future__ import annotations

import copy
import glob
from pathlib import Path

import torch
import transformers
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
from transformers import (
    AutoConfig,
    AutoModelForMaskedLM,
    AutoTokenizer,
    PreTrainedModel,
)

from .checkpoint import LATEST
from .errors import CodirError, error_line

STUDENT_SPEC = "student_spec"  # folder beside the checkpoints: the student's config.json and tokenizer
STUDENT_PREFIX = "student."  # parameters under StudentWithHeads.student; heads are dropped


def save_student_spec(directory: Path, student: PreTrainedModel, tokenizer) -> None:
    """Write what export needs besides weights: the student's config (naming its class) and the shared tokenizer."""
    spec = directory / STUDENT_SPEC
    config = copy.deepcopy(student.config)
    config.architectures = [type(student).__name__]
    config.save_pretrained(spec)
    tokenizer.save_pretrained(spec)


def export_student(checkpoint_dir: str | Path, out_dir: str | Path, tag: str | None = None) -> Path:
    """Write the student (no projection heads) as safetensors + config + tokenizer into `out_dir`."""
    checkpoint_dir, out_dir = Path(checkpoint_dir), Path(out_dir)
    spec = checkpoint_dir / STUDENT_SPEC
    if not spec.is_dir():
        raise CodirError(f"export: {checkpoint_dir} is not a codir-ds checkpoint folder (no {STUDENT_SPEC}/)")
    tag = tag or _latest(checkpoint_dir)
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
    model.save_pretrained(out_dir, safe_serialization=True)
    AutoTokenizer.from_pretrained(spec).save_pretrained(out_dir)
    return out_dir


def _latest(checkpoint_dir: Path) -> str:
    latest = checkpoint_dir / LATEST
    if not latest.is_file():
        raise CodirError(f"export: no checkpoint in {checkpoint_dir} (no '{LATEST}' file)")
    return latest.read_text().strip()


def _consolidated_state(checkpoint_dir: Path, tag: str) -> dict[str, torch.Tensor]:
    folder = checkpoint_dir / tag
    if not folder.is_dir():
        raise CodirError(f"export: no checkpoint {tag!r} in {checkpoint_dir}")
    try:
        if glob.glob(str(folder / "*optim_states.pt")):  # ZeRO 1-3 (or bf16) shards: gather fp32 master weights
            return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir), tag=tag)
        model_file = folder / "mp_rank_00_model_states.pt"
        return torch.load(model_file, map_location="cpu", weights_only=False)["module"]
    except Exception as err:
        raise CodirError(f"export: corrupt checkpoint {folder}: {type(err).__name__}: {error_line(err, limit=200)}") from None
