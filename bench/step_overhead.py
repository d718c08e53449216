"""Step time of a codir-ds CoDIR step vs plain PyTorch baselines, variants interleaved in one run.

    DS_ACCELERATOR=cpu python bench/step_overhead.py [--shapes=tiny,paper] [--repeats=5]
    python bench/step_overhead.py --deepspeed_config=ds_configs/zero2_bf16.json     # on a GPU, in bf16

(a) student alone: masked-LM forward/backward (logits at every position) + AdamW step, plain PyTorch.
(b) plain floor: (a) plus a teacher forward under no_grad.
(c) codir-ds: the trainer's own micro-step through DeepSpeed engines (student ZeRO-2 or ZeRO-0, teacher
    ZeRO-3 or replicated) with MLM + CoDIR against K queued negatives (KD off: no teacher LM head).
The CoDIR part (pooling, heads, InfoNCE over the batch + K negatives, forward and backward) is timed
alone on the same shapes and reported as a share of (c). Prints a Markdown table; medians of `repeats`.
With `--deepspeed_config`, (c) runs that student config (ZeRO-3 and replicated teacher), and where it enables
bf16, (a), (b) and the CoDIR part run their models and tensors in bf16 too. Everything runs on the
accelerator's device (the GPU, or the CPU under DS_ACCELERATOR=cpu).
"""

from __future__ import annotations

import itertools
import json
import statistics
import tempfile
import time
from pathlib import Path

import fire
import torch
from deepspeed.accelerator import get_accelerator
from transformers import BertConfig, BertForMaskedLM, BertModel

from codir_ds.method.losses import ProjectionHeads, contrastive_logits, info_nce
from codir_ds.method.negatives import NegativeQueue
from codir_ds.method.representations import layer_features
from codir_ds.models.ds_config import load_ds_config
from codir_ds.models.loading import plan_models
from codir_ds.pretrain.config import PretrainConfig
from codir_ds.pretrain.run import PretrainRun, build_student_engine, build_teacher_engine, loss_weights, micro_step
from codir_ds.runtime.config import load_config
from codir_ds.runtime.distributed import init_distributed

SHAPES = {
    "tiny": dict(layers=4, hidden=64, heads=4, vocab=1000, seq=32, batch=8),
    "paper": dict(layers=12, hidden=768, heads=12, vocab=30522, seq=128, batch=8),
}


CODIR_VARIANTS = [  # (label, teacher partitioned with ZeRO-3, student DeepSpeed config)
    ("(c) codir-ds, ZeRO-3 teacher, ZeRO-2 student", True, "ds_configs/cpu_small.json"),
    ("(c) codir-ds, replicated teacher, ZeRO-2 student", False, "ds_configs/cpu_small.json"),
    ("(c) codir-ds, replicated teacher, ZeRO-0 student", False, "ds_configs/cpu_zero0.json"),
]


def synthetic_batch(shape: dict, generator: torch.Generator, device: torch.device) -> dict[str, torch.Tensor]:
    ids = torch.randint(5, shape["vocab"], (shape["batch"], shape["seq"]), generator=generator)
    masked = torch.rand(ids.shape, generator=generator) < 0.15
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.masked_fill(~masked, -100)}
    return {name: tensor.to(device) for name, tensor in batch.items()}


def timed(step) -> float:
    get_accelerator().synchronize()
    start = time.perf_counter()
    step()
    get_accelerator().synchronize()  # GPU kernels run asynchronously: wait for them
    return time.perf_counter() - start


def codir_variants(deepspeed_config: str) -> list[tuple[str, bool, str]]:
    """The (c) variants: the built-in CPU-config set, or the given config with a ZeRO-3 and a replicated teacher."""
    if not deepspeed_config:
        return CODIR_VARIANTS
    name = Path(deepspeed_config).name
    return [(f"(c) codir-ds, ZeRO-3 teacher, {name}", True, deepspeed_config), (f"(c) codir-ds, replicated teacher, {name}", False, deepspeed_config)]


def build_variants(shape: dict, folder: Path, queue_length: int, deepspeed_config: str = "") -> dict[str, callable]:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=shape["vocab"],
        hidden_size=shape["hidden"],
        num_hidden_layers=shape["layers"],
        num_attention_heads=shape["heads"],
        intermediate_size=4 * shape["hidden"],
        max_position_embeddings=512,
    )
    BertForMaskedLM(config).save_pretrained(folder)
    device = torch.device(get_accelerator().current_device_name())
    dtype = torch.bfloat16 if deepspeed_config and json.loads(Path(deepspeed_config).read_text()).get("bf16", {}).get("enabled") else torch.float32
    batch = synthetic_batch(shape, torch.Generator().manual_seed(1), device)

    teacher = BertModel.from_pretrained(folder).to(device, dtype).eval()
    student = BertForMaskedLM.from_pretrained(folder, num_hidden_layers=shape["layers"] // 2).to(device, dtype)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4)

    def student_alone():
        student(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def plain_floor():
        with torch.no_grad():
            teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        student_alone()

    variants = {"(a) student alone, MLM": student_alone, "(b) plain floor: teacher fwd + student": plain_floor}
    for label, zero3, ds_config_path in codir_variants(deepspeed_config):
        cfg = load_config(
            PretrainConfig,
            None,
            {
                "teacher.path": str(folder),
                "teacher.zero3": zero3,
                "data.files": ["unused"],
                "loss.kd": 0.0,
                "codir.queue_length": queue_length,
                "train.micro_batch_size": shape["batch"],
                "train.max_steps": 10**6,
                "data.max_seq_length": shape["seq"],
                "train.deepspeed_config": ds_config_path,
            },
        )
        plan = plan_models(cfg)
        ds_config = load_ds_config(cfg.train, world_size=1)
        teacher_engine = build_teacher_engine(cfg, plan, ds_config, with_logits=False)
        student_engine = build_student_engine(cfg, plan, ds_config, loss_weights(cfg, plan))
        queue = NegativeQueue(queue_length, plan.teacher_feature_dim, device=student_engine.device)
        queue.enqueue(torch.randn(queue_length, plan.teacher_feature_dim, device=device))
        # no corpus: the same masked batch every step
        run = PretrainRun(student_engine, teacher_engine, queue, plan, None, cfg.codir.temperature, 0, batches=itertools.repeat(batch))
        variants[label] = lambda run=run: micro_step(run)
    variants["CoDIR part alone (pool, heads, InfoNCE, K queued)"] = codir_part(shape, queue_length, device, dtype)
    return variants


def codir_part(shape: dict, queue_length: int, device: torch.device, dtype: torch.dtype):
    """Forward + backward of pooling, both heads and InfoNCE, given hidden states as the trainer has them
    (in `dtype`; the queue is float32, as the trainer keeps it)."""
    student_layers, batch, seq, hidden = shape["layers"] // 2, shape["batch"], shape["seq"], shape["hidden"]
    heads = ProjectionHeads(student_layers * hidden, student_layers * hidden, 128).to(device, dtype)
    states = [torch.randn(batch, seq, hidden, device=device, dtype=dtype, requires_grad=True) for _ in range(student_layers + 1)]
    teacher_states = [torch.randn(batch, seq, hidden, device=device, dtype=dtype) for _ in range(shape["layers"] + 1)]
    mask = torch.ones(batch, seq, device=device)
    queued = torch.randn(queue_length, student_layers * hidden, device=device)
    teacher_layers = list(range(2, shape["layers"] + 1, 2))
    positives = torch.arange(batch, device=device)

    def step():
        teacher_features = layer_features(teacher_states, teacher_layers, mask)
        anchors = heads.project_student(layer_features(states, range(1, student_layers + 1), mask))
        candidates = heads.project_teacher(torch.cat([teacher_features.float(), queued]))
        info_nce(contrastive_logits(anchors, candidates, positives, 0.07), positives).backward()
        heads.zero_grad(set_to_none=True)

    return step


def main(shapes: str = "tiny,paper", repeats: int = 5, queue_length: int = 4096, deepspeed_config: str = "") -> None:
    """`deepspeed_config`: the student's DeepSpeed config for (c), e.g. ds_configs/zero2_bf16.json on a GPU."""
    init_distributed()
    rows = []
    for name in shapes.split(",") if isinstance(shapes, str) else shapes:
        with tempfile.TemporaryDirectory() as folder:
            variants = build_variants(SHAPES[name], Path(folder), queue_length, deepspeed_config)
            times = {label: [] for label in variants}
            for round_ in range(repeats + 1):  # round 0 warms up
                labels = list(variants)
                for label in labels[round_ % len(labels) :] + labels[: round_ % len(labels)]:  # rotate the order
                    elapsed = timed(variants[label])
                    if round_:
                        times[label].append(elapsed)
        medians = {label: statistics.median(values) for label, values in times.items()}
        floor = medians["(b) plain floor: teacher fwd + student"]
        codir = medians["CoDIR part alone (pool, heads, InfoNCE, K queued)"]
        for label, median in medians.items():
            share = f"{100 * codir / median:.1f}%" if label.startswith("(c)") else ""
            rows.append(f"| {name} | {label} | {median * 1000:.1f} | {median / floor:.2f} | {share} |")
    device = get_accelerator().device_name()
    configs = deepspeed_config or "the CPU configs"
    print(f"\nmedian of {repeats} interleaved steps, K = {queue_length}, {device}, {torch.get_num_threads()} threads, {configs}\n")
    print("| shape | variant | step ms | x plain floor (b) | CoDIR part share |")
    print("| --- | --- | --- | --- | --- |")
    print("\n".join(rows))


if __name__ == "__main__":
    fire.Fire(main)
