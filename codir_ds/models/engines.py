"""DeepSpeed engines for both stages: the frozen (optionally ZeRO-3 partitioned) teacher and the trained student."""

from __future__ import annotations

import gc
from collections.abc import Callable
from pathlib import Path

import deepspeed
from deepspeed.accelerator import get_accelerator
from torch import nn
from transformers import PreTrainedModel
from transformers.integrations import HfDeepSpeedConfig

from ..runtime.distributed import device, local_world_size, print0, world_size
from ..runtime.errors import CodirError, error_line
from .ds_config import compute_dtype, teacher_ds_config
from .loading import load_teacher

TEACHER_MEMORY_SHARE = 4  # teacher.zero3 auto partitions a teacher whose weights need over 1/4 of a rank's memory


def partition_teacher(setting: bool | str, path: str) -> bool:
    """`teacher.zero3`: True/False as given; `auto` partitions only on several ranks, and only a teacher whose weight
    files take more than 1/TEACHER_MEMORY_SHARE of a rank's accelerator memory (a CPU's memory is shared by the
    ranks of its node), since a replicated teacher steps faster (bench/step_speed.py)."""
    if setting != "auto":
        return bool(setting)
    if world_size() == 1:
        return False
    need = sum(f.stat().st_size for f in Path(path).glob("*") if f.suffix in (".safetensors", ".bin"))
    accelerator = get_accelerator()
    have = accelerator.total_memory() // (local_world_size() if accelerator.device_name() == "cpu" else 1)
    partition = need * TEACHER_MEMORY_SHARE > have
    print0(
        f"codir-ds: teacher.zero3 auto: {'partitioned' if partition else 'replicated'}: its weights take "
        f"{need / 2**30:.2f} GiB of a rank's {have / 2**30:.1f} GiB"
    )
    return partition


def frozen_teacher(path: str, auto_class, wrap: Callable[[PreTrainedModel], nn.Module], student_ds_config: dict, zero3: bool | str) -> nn.Module:
    """The frozen teacher at `path` (loaded with `auto_class`, wrapped by `wrap`), in the student's precision.

    Partitioned (`partition_teacher` reads `zero3`) on more than one rank, it is a ZeRO-3 inference engine, loaded
    already partitioned (zero.Init); otherwise a plain module on this rank's device: an engine around a replicated
    model only adds per-call work, and ZeRO-3 on one rank only adds gathers."""
    partition = partition_teacher(zero3, path)
    if partition and world_size() == 1:
        print0("codir-ds: notice: teacher.zero3 on one rank only adds parameter gathers; the teacher runs replicated")
    if not partition or world_size() == 1:
        teacher = wrap(load_teacher(path, auto_class)).to(device(), dtype=compute_dtype(student_ds_config))
        return teacher.eval().requires_grad_(False)
    config = teacher_ds_config(student_ds_config)
    loading = HfDeepSpeedConfig(config)  # must live while from_pretrained runs
    teacher = load_teacher(path, auto_class)
    del loading
    gc.collect()
    engine, *_ = deepspeed.initialize(model=wrap(teacher), config=config)
    engine.eval()
    return engine


def student_engine(module: nn.Module, ds_config: dict, config_path: str) -> deepspeed.DeepSpeedEngine:
    """Training engine of the student module; a config DeepSpeed rejects is reported in one line."""
    try:
        engine, *_ = deepspeed.initialize(model=module, model_parameters=module.parameters(), config=ds_config)
    except (ValueError, KeyError, TypeError, AssertionError) as err:
        raise CodirError(f"train.deepspeed_config {config_path}: {type(err).__name__}: {error_line(err, limit=300)}") from None
    return engine


def parameter_counts(module: nn.Module) -> tuple[int, int]:
    """(total parameters, parameters held by this rank) of a module or engine: they differ under ZeRO-3 partitioning."""
    params = list(module.parameters())
    total = sum(getattr(p, "ds_numel", p.numel()) for p in params)
    here = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in params)
    return total, here
