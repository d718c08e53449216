"""The model card (`README.md`, in the Hugging Face hub's format) of every export: YAML metadata the hub reads
(library, base model, tags, datasets, evaluation results), then how the student was made, its evaluation, its
size against the teacher, how to load it, the codir-ds version and a digest of the run's settings.

`render_card` is a pure function of plain data (`CardFacts`); `checkpoint_card` gathers that data from a
checkpoint folder: `run.json` (the run's settings), the checkpoint's `rank_*.json` and the teacher's config.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from transformers import AutoConfig, AutoModel, PreTrainedModel

from .. import __version__  # the package root holds nothing but its version
from .run_folder import RUN_FILE

PIPELINES = {1: "fill-mask", 2: "text-classification"}  # what each stage's export does
LOADERS = {1: "AutoModelForMaskedLM", 2: "AutoModelForSequenceClassification"}


@dataclass
class CardFacts:
    """What a card says, as plain data."""

    name: str  # the export folder's name
    stage: int  # 1: pre-training distillation, 2: task distillation
    teacher: str  # base_model
    family: str  # the model_type shared by teacher and student
    datasets: list[str]  # corpus sources (stage 1) or the task (stage 2)
    made: dict[str, str]  # how the student was made: setting -> value, in reading order
    student_params: int  # parameters of the base model (`AutoModel`: embeddings, layers, pooler; no task head)
    teacher_params: int | None = None  # the same for the teacher; None when its config is out of reach
    metrics: dict[str, dict[str, float]] | None = None  # split -> metric -> value
    metrics_from: str = ""  # which checkpoint the metrics belong to, e.g. "best dev/accuracy, step 40"
    version: str = __version__
    run_digest: str = ""


def render_card(facts: CardFacts) -> str:
    """The card's text: YAML front matter between `---` lines, then Markdown."""
    meta: dict[str, Any] = {
        "library_name": "transformers",
        "base_model": facts.teacher,
        "pipeline_tag": PIPELINES[facts.stage],
        "tags": ["distillation", "codir", facts.family],
        "datasets": facts.datasets,
    }
    if facts.metrics:
        dataset = facts.datasets[0] if facts.datasets else "unknown"
        meta["model-index"] = [
            {
                "name": facts.name,
                "results": [
                    {
                        "task": {"type": PIPELINES[facts.stage]},
                        "dataset": {"name": dataset, "type": dataset, "split": split},
                        "metrics": [{"type": metric, "value": float(value), "name": f"{split} {metric}"} for metric, value in values.items()],
                    }
                    for split, values in facts.metrics.items()
                ],
            }
        ]
    stage = "pre-training distillation (stage 1)" if facts.stage == 1 else "task distillation (stage 2)"
    lines = ["---", yaml.safe_dump(meta, sort_keys=False, allow_unicode=True).rstrip(), "---", "", f"# {facts.name}", ""]
    lines += [f"A {facts.family} student distilled from `{facts.teacher}` by CoDIR {stage} with codir-ds {facts.version}.", ""]
    lines += ["## How it was made", "", "| setting | value |", "| --- | --- |", *[f"| {k} | {v} |" for k, v in facts.made.items()], ""]
    if facts.metrics:
        columns = sorted({metric for values in facts.metrics.values() for metric in values})
        lines += ["## Evaluation", "", f"Scores of the exported checkpoint{f' ({facts.metrics_from})' if facts.metrics_from else ''}.", ""]
        lines += [f"| split | {' | '.join(columns)} |", "| --- |" + " --- |" * len(columns)]
        lines += [f"| {split} | " + " | ".join(_number(values.get(m)) for m in columns) + " |" for split, values in facts.metrics.items()]
        lines.append("")
    lines += ["## Size", "", "| model | parameters (base model: embeddings, layers, pooler) |", "| --- | --- |"]
    lines.append(f"| student | {facts.student_params / 1e6:.2f}M |")
    if facts.teacher_params:
        share = facts.student_params / facts.teacher_params
        lines += [f"| teacher | {facts.teacher_params / 1e6:.2f}M |", "", f"The student has {share:.0%} of the teacher's parameters."]
    path, loader = f"path/to/{facts.name}", LOADERS[facts.stage]
    lines += ["", "## How to load it", "", "```python", f"from transformers import AutoModel, {loader}, AutoTokenizer", ""]
    lines += [f'tokenizer = AutoTokenizer.from_pretrained("{path}")', f'encoder = AutoModel.from_pretrained("{path}")  # hidden states']
    lines += [f'model = {loader}.from_pretrained("{path}")  # with its head', "```", ""]
    digest = f"; run digest `{facts.run_digest}` (sha256 of the settings in `checkpoints/{RUN_FILE}`)" if facts.run_digest else ""
    lines.append(f"Made with codir-ds {facts.version}{digest}.")
    return "\n".join(lines) + "\n"


def checkpoint_card(checkpoint_dir: Path, tag: str, student: PreTrainedModel, name: str, metrics: dict[str, dict[str, float]] | None = None) -> str:
    """The card of `student`, exported from checkpoint `tag` of `checkpoint_dir`, with what the folder tells of the run.
    `metrics` (split -> metric -> value) default to the best dev scores a stage-2 checkpoint carries, or the last
    held-out evaluation of a stage-1 checkpoint."""
    record = _json(checkpoint_dir / RUN_FILE)
    identity, config = record.get("identity", {}), record.get("config", {})
    state = _json(checkpoint_dir / tag / "rank_0.json")
    stage = 2 if "task.name" in identity else 1
    teacher = config.get("teacher", {}).get("path") or str(identity.get("teacher.path", "unknown")).rsplit(" (", 1)[0]
    teacher_config = _teacher_config(teacher)
    best, held_out = state.get("best") or {}, state.get("eval") or {}  # stage 2's best dev scores, stage 1's last evaluation
    if not metrics and best:
        metrics, metrics_from = best["metrics"], f"best {best['metric']}, step {best['step']}"
    elif not metrics and held_out:
        metrics, metrics_from = {"held-out": held_out["metrics"]}, f"held-out blocks, step {held_out['step']}"
    else:
        metrics_from = ""
    facts = CardFacts(
        name=name,
        stage=stage,
        teacher=teacher,
        family=student.config.model_type,
        datasets=_datasets(stage, identity, config),
        made=_made(stage, identity, state, student, teacher_config, ranks=len(list((checkpoint_dir / tag).glob("rank_*.json"))), tag=tag),
        student_params=_encoder_params(student.config),
        teacher_params=_encoder_params(teacher_config) if teacher_config else None,
        metrics=metrics,
        metrics_from=metrics_from,
        run_digest=hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12] if identity else "",
    )
    return render_card(facts)


def _made(stage: int, identity: dict, state: dict, student: PreTrainedModel, teacher_config, ranks: int, tag: str) -> dict[str, str]:
    step, batch = state.get("step"), identity.get("train.global_batch")
    seen = (
        f"{state['data']['consumed_samples'] * identity['data.max_seq_length']:,} tokens"
        if stage == 1 and "data" in state and "data.max_seq_length" in identity
        else (f"{step * batch:,} examples" if step is not None and batch else None)
    )
    precision = "bf16" if identity.get("deepspeed.bf16") else "fp16" if identity.get("deepspeed.fp16") else "fp32"
    rows = {
        "teacher layers": teacher_config.num_hidden_layers if teacher_config else None,
        "student layers": f"{student.config.num_hidden_layers}, initialised from {identity.get('student.init', '?')}",
        "layer map (teacher layer of each student layer)": identity.get("layer_map"),
        "pooling": identity.get("codir.pooling"),
        "loss weights": _joined(identity, "loss."),
        "CoDIR": _joined(identity, "codir.", skip=("codir.pooling", "codir.layer_map")),
        "optimizer steps": step,
        "seen": seen,
        "global batch": batch,
        "learning rate": identity.get("train.lr"),
        "precision": precision if identity else None,
        "ranks": ranks or None,
        "checkpoint": tag,
    }
    return {k: str(v) for k, v in rows.items() if v is not None}


def _datasets(stage: int, identity: dict, config: dict) -> list[str]:
    if stage == 2:
        train_file = identity.get("task.train_file")
        return [identity["task.name"] if identity["task.name"] != "custom" or not train_file else Path(train_file).name]
    data = config.get("data", {})
    return (
        [data["dataset"]]
        if data.get("dataset")
        else [Path(f).name for f in data.get("files", [])] or ([data["prepared"]] if data.get("prepared") else [])
    )


def _joined(identity: dict, prefix: str, skip: tuple[str, ...] = ()) -> str | None:
    items = [f"{k.removeprefix(prefix)} {v}" for k, v in identity.items() if k.startswith(prefix) and k not in skip]
    return ", ".join(items) or None


def _teacher_config(teacher: str):
    return AutoConfig.from_pretrained(teacher) if Path(teacher, "config.json").is_file() else None


def _encoder_params(config) -> int:
    """Parameters of the base model `config` describes, counted on the meta device (no memory, no weights read)."""
    with torch.device("meta"):
        return sum(p.numel() for p in AutoModel.from_config(config).parameters())


def _json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _number(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"
