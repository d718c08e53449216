"""DeepSpeed configs: read the user's JSON, fill "auto" values from the run config, derive the teacher's."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from deepspeed.accelerator import get_accelerator

from ..runtime.config import TrainConfig
from ..runtime.distributed import print0
from ..runtime.errors import CodirError

SHIPPED_CONFIGS = Path(__file__).resolve().parents[2] / "ds_configs"


def auto_ds_config(world_size: int) -> tuple[Path, str]:
    """`train.deepspeed_config: auto`: the shipped config for this accelerator, its precision support and world size,
    and why. On a CPU, fp32 without ZeRO on one rank (the fastest there, bench/step_speed.py) and ZeRO-2 on several;
    on a GPU, bf16 with ZeRO-2 where supported, else fp16 with ZeRO-2, else fp32 without ZeRO."""
    accelerator = get_accelerator()
    ranks = f"{world_size} rank{'s' if world_size > 1 else ''}"
    if accelerator.device_name() == "cpu":
        return SHIPPED_CONFIGS / ("cpu_zero0.json" if world_size == 1 else "cpu_small.json"), f"CPU, fp32, {ranks}"
    half = (("bf16", accelerator.is_bf16_supported, "zero2_bf16.json"), ("fp16", accelerator.is_fp16_supported, "zero2_fp16.json"))
    for precision, supported, name in half:
        if supported():
            return SHIPPED_CONFIGS / name, f"{accelerator.device_name()} with {precision}, {ranks}"
    return SHIPPED_CONFIGS / "gpu_zero0.json", f"{accelerator.device_name()} without bf16 or fp16, {ranks}"


def chosen_ds_config(train: TrainConfig, world_size: int, first_choice: str | None = None) -> TrainConfig:
    """`train` with `deepspeed_config: auto` replaced by a file, and the choice printed: `first_choice`, what a
    resumed run's first start chose (so an elastic resume keeps its ZeRO stage), else `auto_ds_config`'s pick."""
    if train.deepspeed_config != "auto":
        return train
    if first_choice and first_choice != "auto":
        path, why = Path(first_choice), "as the run's first start chose"
    else:
        path, why = auto_ds_config(world_size)
    print0(f"codir-ds: train.deepspeed_config auto: {path} ({why})")
    return dataclasses.replace(train, deepspeed_config=str(path))


def load_ds_config(train: TrainConfig, world_size: int) -> dict[str, Any]:
    """The student's DeepSpeed config with every "auto" value resolved; raises `CodirError` on a bad file."""
    path = Path(chosen_ds_config(train, world_size).deepspeed_config)
    if not path.is_file():
        raise CodirError(f"train.deepspeed_config: no such file {path}")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CodirError(f"train.deepspeed_config: {path} is not valid JSON ({err})") from None
    if not isinstance(config, dict):
        raise CodirError(f"train.deepspeed_config: {path} must hold a JSON object")
    auto = {  # DeepSpeed key: (run-config key, value)
        "train_micro_batch_size_per_gpu": ("train.micro_batch_size", train.micro_batch_size),
        "gradient_accumulation_steps": ("train.gradient_accumulation_steps", train.gradient_accumulation_steps),
        "train_batch_size": (
            "train.micro_batch_size x train.gradient_accumulation_steps x ranks",
            train.micro_batch_size * train.gradient_accumulation_steps * world_size,
        ),
        "optimizer.params.lr": ("train.lr", train.lr),
        "scheduler.params.warmup_max_lr": ("train.lr", train.lr),
        "scheduler.params.warmup_num_steps": ("train.warmup_steps", max(1, train.warmup_steps)),  # DeepSpeed rejects 0
        "scheduler.params.total_num_steps": ("train.max_steps", train.max_steps),
        "gradient_clipping": ("train.gradient_clipping", train.gradient_clipping),
    }
    for dotted, (key, value) in auto.items():
        given = _fill(config, dotted, value)
        if given is not None and given != "auto" and given != value and not (dotted.endswith("warmup_num_steps") and given == train.warmup_steps):
            raise CodirError(
                f"train.deepspeed_config: {path} sets {dotted} to {given!r} but the run config has {key} = {value!r}; "
                f'write "auto" there (codir-ds fills it from the run config) or set the run config instead'
            )
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size", "gradient_clipping"):
        config.setdefault(key, auto[key][1])
    _reject_leftover_auto(config, str(path), "")
    _check_precision(config, path)
    # per-step extras the run already covers, off unless the file asks for them: the monitor measures throughput
    # (DeepSpeed's timer synchronises the device every step), and the loop stops on a non-finite loss (bf16's
    # gradient check loops over every gradient)
    config.setdefault("timers", {"throughput": {"enabled": False}})
    if compute_dtype(config) == torch.bfloat16:
        config["bf16"].setdefault("check_grad_overflow", False)
    stage = config.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise CodirError(f"train.deepspeed_config: zero_optimization.stage is {stage!r}; use 0, 1, 2 or 3")
    return config


def compute_dtype(config: dict[str, Any]) -> torch.dtype:
    """The precision a DeepSpeed config computes in: bfloat16, float16 or float32."""
    for key, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        if isinstance(config.get(key), dict) and config[key].get("enabled"):
            return dtype
    return torch.float32


def teacher_ds_config(student_config: dict[str, Any]) -> dict[str, Any]:
    """Inference-only config for the frozen teacher partitioned with ZeRO-3, in the student's precision."""
    config = {key: copy.deepcopy(student_config[key]) for key in ("bf16", "fp16") if key in student_config}
    config["train_micro_batch_size_per_gpu"] = student_config["train_micro_batch_size_per_gpu"]
    config["gradient_accumulation_steps"] = student_config["gradient_accumulation_steps"]
    config["train_batch_size"] = student_config["train_batch_size"]
    config["zero_optimization"] = {"stage": 3}
    return config


def _check_precision(config: dict, path: Path) -> None:
    """bf16 or fp16 only where the accelerator runs it: fp16 with its loss scaling is for GPUs."""
    accelerator = get_accelerator()
    for precision, supported in (("bf16", accelerator.is_bf16_supported), ("fp16", accelerator.is_fp16_supported)):
        if isinstance(config.get(precision), dict) and config[precision].get("enabled") and not supported():
            raise CodirError(
                f"train.deepspeed_config: {path} enables {precision}, which DeepSpeed's {accelerator.device_name()} accelerator does not "
                "support here; on a CPU use ds_configs/cpu_bf16.json (where bf16 is supported) or ds_configs/cpu_small.json (fp32)"
            )


def _fill(config: dict, dotted: str, value: Any) -> Any:
    """Replace an "auto" at `dotted` with `value`; return what the file gave there (None when absent)."""
    *parents, leaf = dotted.split(".")
    node = config
    for part in parents:
        node = node.get(part)
        if not isinstance(node, dict):
            return None
    given = node.get(leaf)
    if given == "auto":
        node[leaf] = value
    return given


def _reject_leftover_auto(node: Any, path: str, prefix: str) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            if value == "auto":
                raise CodirError(f'train.deepspeed_config: {path} has "auto" for {prefix}{key}, which codir-ds cannot fill')
            _reject_leftover_auto(value, path, f"{prefix}{key}.")
