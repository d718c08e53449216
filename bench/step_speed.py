"""Stage-1 step speed: codir-ds's micro-step against a same-work floor in plain PyTorch, in one process.

    DS_ACCELERATOR=cpu python bench/step_speed.py [--shapes=tiny,paper] [--rounds=5] [--steps=10] [--large_steps=3] [--warmup=3]
    python bench/step_speed.py --peak_tflops=989          # on an accelerator: adds 64x128, 256x128, 32x512

Variants, interleaved with the order rotated every round:
  F  the same-work floor (`floor.py`): teacher forward, student forward/backward with MLM + KD at the masked
     positions only, the CoDIR part (pooling, both heads, InfoNCE over the batch + K queued features), dropout on,
     clipping, AdamW and lr schedule of the DeepSpeed config, its precision. One floor per precision in use.
  C  codir-ds's own micro-step for each shipped config that applies (`CONFIGS`): the one-device default, the
     multi-rank ZeRO-2 default and a ZeRO-3 teacher. In one process these run at world size 1.
Every variant gets the same micro-batches in a round. Timing: `warmup` steps, then `rounds` of `steps` steps with
one synchronise at each end (`large_steps` at shapes other than tiny); the median over rounds. FLOPs for TFLOP/s and MFU: `model_flops`, as written in
docs/performance.md. Prints a Markdown table per shape, then the summary line.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import fire
import torch
from deepspeed.accelerator import get_accelerator
from torch import nn
from transformers import BertConfig, BertForMaskedLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
from floor import FloorSettings, FloorStep, Heads, masked_batch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MODELS = {  # the teacher; the student keeps half its layers
    "tiny": dict(layers=4, hidden=64, heads=4, vocab=1000),
    "base": dict(layers=12, hidden=768, heads=12, vocab=30522),
}
SHAPES = {  # name: (model, micro-batch, sequence length, accelerator only)
    "tiny": ("tiny", 8, 32, False),
    "paper": ("base", 8, 128, False),
    "64x128": ("base", 64, 128, True),
    "256x128": ("base", 256, 128, True),
    "32x512": ("base", 32, 512, True),
}
CONFIGS = {  # device type: [(label, student DeepSpeed config, ZeRO-3 teacher, train.compile)]; the first is the one-device default
    "cpu": [
        ("one-device default: ZeRO-0, replicated teacher (cpu_zero0)", "ds_configs/cpu_zero0.json", False, False),
        ("one-device default, compiled (train.compile)", "ds_configs/cpu_zero0.json", False, True),
        ("multi-rank default: ZeRO-2 (cpu_small), world size 1", "ds_configs/cpu_small.json", False, False),
        ("ZeRO-3 teacher + ZeRO-2 (cpu_small), world size 1", "ds_configs/cpu_small.json", True, False),
    ],
    "cuda": [
        ("one-device default: ZeRO-0 fp32, replicated teacher (gpu_zero0)", "ds_configs/gpu_zero0.json", False, False),
        ("one-device default, compiled (train.compile)", "ds_configs/gpu_zero0.json", False, True),
        ("multi-rank default: ZeRO-2 bf16 (zero2_bf16), world size 1", "ds_configs/zero2_bf16.json", False, False),
        ("ZeRO-3 teacher + ZeRO-2 bf16 (zero2_bf16), world size 1", "ds_configs/zero2_bf16.json", True, False),
    ],
}
PEAK_TFLOPS = {  # dense, vendor data sheets: bf16 tensor cores; fp32 without TF32 (torch's default for matmuls)
    "H200": {"bf16": 989.0, "fp32": 67.0},
    "H100": {"bf16": 989.0, "fp32": 67.0},
    "A100": {"bf16": 312.0, "fp32": 19.5},
}


@dataclass
class CodirDsStep:
    """codir-ds's stage-1 micro-step, built for the bench and the equality test."""

    step: Callable[[dict], dict[str, torch.Tensor]]  # one micro-step (forward, backward, optimizer step, enqueue) on this batch
    student: nn.Module  # the masked-LM student (trained)
    heads: nn.Module  # its projection heads: .student, .teacher
    queued: torch.Tensor  # the K teacher features the first step sees as negatives, in the queue's storage order
    settings: FloorSettings  # what the floor needs to do the same work


def codir_ds_step(overrides: dict, teacher_folder: Path, batch: int, seq: int) -> CodirDsStep:
    """The one place that builds the codir-ds variant: `PretrainStage`'s own `build` and `micro_step`, with the
    bench's micro-batch in place of the corpus loader. The queue starts full of seeded random features."""
    from codir_ds.models.ds_config import load_ds_config
    from codir_ds.models.loading import plan_models
    from codir_ds.pretrain.config import PretrainConfig
    from codir_ds.pretrain.run import PretrainStage, loss_weights
    from codir_ds.runtime.config import load_config
    from codir_ds.runtime.distributed import init_distributed

    init_distributed()
    cfg = load_config(
        PretrainConfig,
        None,
        {
            "teacher.path": str(teacher_folder),
            "data.files": ["unused"],
            "train.micro_batch_size": batch,
            "data.max_seq_length": seq,
            "train.max_steps": 10**6,
            "train.warmup_steps": 100,
            **overrides,
        },
    )
    stage = PretrainStage.__new__(PretrainStage)  # no corpus: `step` hands the stage each micro-batch
    stage.cfg, stage.plan = cfg, plan_models(cfg)
    stage.weights = loss_weights(cfg, stage.plan)
    ds_config = load_ds_config(cfg.train, world_size=1)
    stage.build(ds_config)
    if cfg.train.compile:
        stage.compile()
    queue = stage.objective.queue
    queue.enqueue(torch.randn(queue.length, queue.features.shape[1], generator=torch.Generator().manual_seed(2)).to(queue.features.device))
    current = {}
    stage.batches, stage.next_micro_batch = (current["batch"] for _ in itertools.count()), 0

    def step(micro_batch: dict) -> dict[str, torch.Tensor]:
        current["batch"] = micro_batch
        return stage.micro_step()

    w = stage.weights
    settings = FloorSettings(
        stage.plan.layer_map, w.mlm, w.kd, w.kd_temperature, w.codir, cfg.codir.temperature,
        cfg.codir.queue_length, cfg.codir.projection_dim, ds_config,
    )  # fmt: skip
    return CodirDsStep(step, stage.student.module.student, stage.objective.heads, queue.stored()[0].clone(), settings)


def floor_step(codir: CodirDsStep, teacher_folder: Path, device: torch.device) -> FloorStep:
    """The same-work floor, starting from the codir-ds variant's weights (student, heads, queue) and teacher."""
    teacher = BertForMaskedLM.from_pretrained(teacher_folder).to(device).eval().requires_grad_(False)
    student = BertForMaskedLM(codir.student.config).to(device)
    student.load_state_dict({name: value.float() for name, value in codir.student.state_dict().items()})
    heads = Heads(codir.heads.student.in_features, codir.heads.teacher.in_features, codir.heads.student.out_features).to(device)
    heads.load_state_dict({name: value.float() for name, value in codir.heads.state_dict().items()})
    return FloorStep(teacher, student, heads, codir.queued.to(device), codir.settings)


def write_teacher(folder: Path, model: dict) -> Path:
    """A random-weight BERT with an MLM head (so KD is on), dropout 0.1."""
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=model["vocab"],
        hidden_size=model["hidden"],
        num_hidden_layers=model["layers"],
        num_attention_heads=model["heads"],
        intermediate_size=4 * model["hidden"],
        max_position_embeddings=512,
    )
    BertForMaskedLM(config).save_pretrained(folder)
    return folder


def model_flops(model: dict, batch: int, seq: int, settings: FloorSettings) -> float:
    """Model FLOPs of one step (docs/performance.md): teacher forward, student forward + backward (2x), MLM heads at
    the masked positions, the CoDIR heads and similarities. Embeddings, norms, softmax and pooling are not counted."""
    d, vocab, t_layers = model["hidden"], model["vocab"], model["layers"]
    s_layers, masked, k = len(settings.layer_map), batch * max(1, round(0.15 * seq)), settings.queue_length
    layer = 2 * 12 * d * d + 4 * seq * d  # per token, forward
    head = 2 * d * vocab  # per predicted token, forward
    teacher = batch * seq * t_layers * layer + (masked * head if settings.kd > 0 else 0)
    student = 3 * (batch * seq * s_layers * layer + masked * head)
    feature, projection, candidates = s_layers * d, settings.projection_dim, batch + k
    codir = 3 * 2 * batch * feature * projection + 2 * 2 * candidates * feature * projection + 3 * 2 * batch * candidates * projection
    return float(teacher + student + codir)


def precision(settings: FloorSettings) -> str:
    return "bf16" if settings.ds_config.get("bf16", {}).get("enabled") else "fp32"


def device_peak(device: torch.device, given: float) -> tuple[dict[str, float | None], str]:
    """Peak FLOP/s by precision and where it came from: `given`, the accelerator table, or an estimate for this CPU (fp32)."""
    if given:
        return {"fp32": given, "bf16": given}, f"--peak_tflops {given}"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peaks in PEAK_TFLOPS.items():
            if key in name:
                return peaks, f"table: {key} {peaks['bf16']:.0f} bf16 / {peaks['fp32']:.0f} fp32 TFLOP/s"
        return {"fp32": None, "bf16": None}, f"{name} not in the table: MFU n/a (give --peak_tflops)"
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    mhz = next((float(line.split(":")[1]) for line in info.splitlines() if line.startswith("cpu MHz")), 0.0)
    flags = next((line.split(":")[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    per_cycle = 64 if "avx512f" in flags else 32 if "fma" in flags else 8  # fp32 FLOPs/cycle/core: 2 FMA units x lanes x 2
    threads = torch.get_num_threads()
    if not mhz:
        return {"fp32": None, "bf16": None}, "CPU peak unknown: MFU n/a (give --peak_tflops)"
    peak = threads * mhz * 1e-6 * per_cycle
    return {"fp32": peak, "bf16": None}, (
        f"stated CPU fp32 peak {peak:.3f} TFLOP/s = {threads} threads x {mhz / 1000:.2f} GHz x {per_cycle} FLOP/cycle "
        f"(2 FMA units, {'AVX-512' if per_cycle == 64 else 'AVX2'}); bf16 MFU n/a"
    )


class PeakMemory:
    """Peak memory during a variant's rounds: CUDA max_memory_allocated, or on a CPU the process's peak RSS (VmHWM,
    reset through /proc/self/clear_refs where allowed; every variant's models are resident in the one process)."""

    def __init__(self, device: torch.device):
        self.device = device

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            with contextlib.suppress(OSError):
                Path("/proc/self/clear_refs").write_text("5")

    def read(self) -> float:
        """GiB."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**30
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def synchronize() -> None:
    get_accelerator().synchronize()


def measure(shape_name: str, configs: list, rounds: int, steps: int, warmup: int, device: torch.device, folder: Path) -> list[dict]:
    """The rows of one shape: each variant's median ms/step and peak memory (variants interleaved, order rotated)."""
    model_name, batch, seq, _ = SHAPES[shape_name]
    model = MODELS[model_name]
    teacher = write_teacher(folder / model_name, model)
    variants: dict[str, tuple[Callable, FloorSettings, str]] = {}  # label: (step, settings, floor label)
    for label, config, zero3, compiled in configs:
        overrides = {"train.deepspeed_config": str(REPO / config), "teacher.zero3": zero3, "train.compile": compiled}
        codir = codir_ds_step(overrides, teacher, batch, seq)
        floor_label = f"F same-work floor, {precision(codir.settings)}"
        if floor_label not in variants:  # the floor starts from the first codir-ds variant's weights of its precision
            variants[floor_label] = (floor_step(codir, teacher, device), codir.settings, floor_label)
        variants[f"C codir-ds {label}"] = (codir.step, codir.settings, floor_label)
    generator = torch.Generator().manual_seed(1)

    def batches(count: int) -> list[dict]:
        return [{k: v.to(device) for k, v in masked_batch(batch, seq, model["vocab"], generator).items()} for _ in range(count)]

    for step, _, _ in variants.values():
        for micro_batch in batches(warmup):
            step(micro_batch)
    synchronize()
    times = {label: [] for label in variants}
    memory = dict.fromkeys(variants, 0.0)
    peak = PeakMemory(device)
    labels = list(variants)
    for round_ in range(rounds):
        micro_batches = batches(steps)  # the same micro-batches for every variant of this round
        for label in labels[round_ % len(labels) :] + labels[: round_ % len(labels)]:
            step = variants[label][0]
            peak.reset()
            synchronize()
            start = time.perf_counter()
            for micro_batch in micro_batches:
                step(micro_batch)
            synchronize()  # one synchronise at each end: throughput, not latency
            times[label].append((time.perf_counter() - start) / steps)
            memory[label] = max(memory[label], peak.read())
    rows = []
    for label, (_, settings, floor_label) in variants.items():
        seconds = statistics.median(times[label])
        rows.append(
            dict(
                shape=shape_name,
                variant=label,
                precision=precision(settings),
                seconds=seconds,
                spread=(min(times[label]), max(times[label])),
                tokens=batch * seq / seconds,
                flops=model_flops(model, batch, seq, settings) / seconds,
                memory=memory[label],
                floor=floor_label,
            )
        )
    floors = {row["variant"]: row["seconds"] for row in rows if row["variant"].startswith("F ")}
    for row in rows:
        row["ratio"] = row["seconds"] / floors[row["floor"]]
    return rows


def main(shapes: str = "", rounds: int = 5, steps: int = 10, large_steps: int = 3, warmup: int = 3, peak_tflops: float = 0.0) -> None:
    """`shapes`: comma-separated names of SHAPES (default: tiny,paper, plus the large ones on an accelerator);
    `steps`: steps per round at tiny, `large_steps` at the other shapes;
    `peak_tflops`: the device's peak for MFU (default: the accelerator table, or a stated CPU estimate)."""
    device = torch.device(get_accelerator().current_device_name())
    accelerator = device.type != "cpu"
    if isinstance(shapes, str):
        shapes = [name for name in shapes.split(",") if name]
    names = list(shapes) or [name for name, shape in SHAPES.items() if accelerator or not shape[3]]
    configs = CONFIGS.get(device.type, CONFIGS["cuda"])
    peaks, peak_source = device_peak(device, peak_tflops)
    threads = torch.get_num_threads()
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU {platform.machine()}, {threads} threads"
    all_rows, skipped, load = [], [], os.getloadavg()[0]
    for name in names:
        with tempfile.TemporaryDirectory() as folder:
            try:
                all_rows += measure(name, configs, rounds, steps if name == "tiny" else large_steps, warmup, device, Path(folder))
            except torch.OutOfMemoryError as err:
                skipped.append(f"{name} (out of memory: {str(err).splitlines()[0][:120]})")
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    print(f"\nstep_speed: {device_name}; torch {torch.__version__}; 1-minute load average {load:.2f} at start, {os.getloadavg()[0]:.2f} at end")
    print(f"median of {rounds} rounds x {steps} steps (tiny) or {large_steps} (larger shapes) after {warmup} warm-up steps, variants interleaved")
    print("multi-rank configs run at world size 1 in this one process (no collective has a peer)")
    print(f"peak for MFU: {peak_source}")
    print(f"peak memory: {'CUDA max_memory_allocated' if device.type == 'cuda' else 'process peak RSS (all variants resident in one process)'}")
    for name in dict.fromkeys(row["shape"] for row in all_rows):
        model_name, batch, seq, _ = SHAPES[name]
        model = MODELS[model_name]
        layers, hidden = model["layers"], model["hidden"]
        print(f"\n### {name}: teacher {layers} x {hidden} -> student {layers // 2} x {hidden}, micro-batch {batch} x {seq}, vocab {model['vocab']}")
        print("| variant | precision | ms/step (min-max) | tokens/s | model TFLOP/s | MFU | peak mem GiB | x F |")
        print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
        for row in (r for r in all_rows if r["shape"] == name):
            peak = peaks.get(row["precision"])
            mfu = f"{100 * row['flops'] / (peak * 1e12):.1f} %" if peak else "n/a"
            low, high = row["spread"]
            print(
                f"| {row['variant']} | {row['precision']} | {1000 * row['seconds']:.1f} ({1000 * low:.1f}-{1000 * high:.1f}) | "
                f"{row['tokens']:,.0f} | {row['flops'] / 1e12:.3f} | {mfu} | {row['memory']:.2f} | {row['ratio']:.2f} |"
            )
    for line in skipped:
        print(f"skipped: {line}")

    default = f"C codir-ds {configs[0][0]}"  # the summary follows the one-device default

    def ratio(shape: str) -> str:
        row = next((r for r in all_rows if r["shape"] == shape and r["variant"] == default), None)
        return f"{row['ratio']:.2f}" if row else "n/a"

    measured = [r for r in all_rows if r["variant"] == default]
    largest = max(measured, key=lambda r: r["flops"] * r["seconds"], default=None)  # the most FLOPs per step
    peak = peaks.get(largest["precision"]) if largest else None
    mfu = f"{100 * largest['flops'] / (peak * 1e12):.1f}" if peak else "n/a"
    print(f"\n(summary: {default} against the floor of its precision)")
    print(
        f"step: codir-ds {ratio('tiny')} x same-work floor at tiny, {ratio('paper')} x at paper ({device_name}); "
        f"largest shape {largest['shape'] if largest else 'n/a'}: MFU {mfu} %"
    )


if __name__ == "__main__":
    fire.Fire(main)
