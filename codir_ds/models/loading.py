"""Loading teacher and student with transformers' Auto classes, and initialising the student from the teacher."""

from __future__ import annotations

import copy
import dataclasses
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForMaskedLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
)

from ..method.layer_map import resolve_layer_map
from ..runtime.config import StudentConfig
from ..runtime.errors import CodirError, error_line
from .encoders import EncoderLayout, encoder_layout, layer_list


@dataclass
class ModelPlan:
    """What a run will build, worked out from configs and file headers before any weights load."""

    teacher_config: PretrainedConfig
    student_config: PretrainedConfig
    layer_map: list[int]  # teacher layer (1-based) for each student layer
    teacher_has_mlm_head: bool
    layout: EncoderLayout  # the teacher family's layer list and masked-LM head

    @property
    def teacher_feature_dim(self) -> int:
        """Width of a pooled teacher feature: one hidden vector per mapped layer, concatenated."""
        return len(self.layer_map) * self.teacher_config.hidden_size


def plan_models(cfg) -> ModelPlan:
    """Check teacher, student and layer map of a stage's run config (its `teacher`, `student` and `codir`
    sections) against each other; raise `CodirError` on any mismatch."""
    teacher_config = read_model_config(cfg.teacher.path, "teacher.path")
    check_tokenizer_fits(load_tokenizer(cfg.teacher.path, "teacher.path"), teacher_config, cfg.teacher.path)
    layout = encoder_layout(teacher_config)
    if cfg.student.init == "teacher_layers" and layout.layers is None:
        raise CodirError(
            f"student.init: teacher_layers needs one set of weights per layer, but {layout.model_type} ({cfg.teacher.path}) shares "
            "its weights across layers; use student.init=config or student.init=checkpoint"
        )
    student_cfg = cfg.student
    if student_cfg.init == "teacher_layers" and not student_cfg.num_layers and isinstance(cfg.codir.layer_map, list):
        student_cfg = dataclasses.replace(student_cfg, num_layers=len(cfg.codir.layer_map))
    student_config = student_model_config(student_cfg, teacher_config)
    layer_map = resolve_layer_map(cfg.codir.layer_map, student_config.num_hidden_layers, teacher_config.num_hidden_layers)
    if student_cfg.init == "teacher_layers" and getattr(teacher_config, "layer_types", None):  # e.g. ModernBERT's local/global attention
        student_config.layer_types = [teacher_config.layer_types[layer - 1] for layer in layer_map]  # each copied layer keeps its kind
    head = has_mlm_head(cfg.teacher.path, layout) if Path(cfg.teacher.path).is_dir() else True
    return ModelPlan(teacher_config, student_config, layer_map, head, layout)


def read_model_config(source: str, role: str) -> PretrainedConfig:
    """The `config.json` of a model folder (or hub name), without loading weights."""
    if _looks_local(source) and not Path(source, "config.json").is_file():
        raise CodirError(f"{role}: no config.json in {source!r} (expected a Hugging Face model folder)")
    try:
        return AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as err:
        raise CodirError(f"{role}: cannot read the model config at {source!r}: {error_line(err)}") from None


def load_tokenizer(source: str, role: str):
    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError, TypeError) as err:
        raise CodirError(f"{role}: cannot load a tokenizer from {source!r}: {error_line(err)}") from None


def check_tokenizer_fits(tokenizer, config: PretrainedConfig, source: str) -> None:
    """Refuse a tokenizer whose ids reach past the model's embedding rows (tokens added without resizing them)."""
    top = max(tokenizer.get_vocab().values(), default=-1)
    if top >= config.vocab_size:
        raise CodirError(
            f"teacher.path: the tokenizer of {source!r} has ids up to {top}, past the teacher's {config.vocab_size} embedding rows; "
            "use the tokenizer the teacher was trained with, or resize its embeddings (resize_token_embeddings) and save it"
        )


def checkpoint_tensor_names(source: str) -> list[str]:
    """Names of the tensors stored in a local model folder, read from file headers only."""
    return list(_checkpoint_tensors(source))


def has_mlm_head(source: str, layout: EncoderLayout | None = None) -> bool:
    """Whether the checkpoint holds every trained tensor of its family's masked-LM head (a sentence-embedding
    model, or a classifier, does not)."""
    layout = layout or encoder_layout(read_model_config(source, "teacher.path"))
    return set(layout.head_tensors) <= set(checkpoint_tensor_names(source))


def has_classifier_head(source: str) -> bool:
    """Whether the checkpoint holds a sequence-classification head (a teacher finetuned on a task)."""
    return any(name.startswith(("classifier.", "score.")) for name in checkpoint_tensor_names(source))


def load_teacher(source: str, auto_class=AutoModel) -> PreTrainedModel:
    """The frozen teacher: eval mode, no gradients. Under an active `HfDeepSpeedConfig` with ZeRO-3,
    `from_pretrained` loads it already partitioned, so no rank holds the whole model."""
    try:
        teacher = auto_class.from_pretrained(source)
    except (OSError, ValueError) as err:
        raise CodirError(f"teacher.path: cannot load {source!r}: {error_line(err)}") from None
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher


def student_model_config(cfg: StudentConfig, teacher_config: PretrainedConfig) -> PretrainedConfig:
    """The student's architecture, checked to share the teacher's vocabulary."""
    if cfg.init == "teacher_layers":
        student_config = copy.deepcopy(teacher_config)
        student_config.num_hidden_layers = cfg.num_layers or max(1, teacher_config.num_hidden_layers // 2)
        if student_config.num_hidden_layers > teacher_config.num_hidden_layers:
            raise CodirError(f"student.num_layers: {cfg.num_layers} exceeds the teacher's {teacher_config.num_hidden_layers} layers")
        return student_config
    source = cfg.config_path if cfg.init == "config" else cfg.checkpoint
    key = "student.config_path" if cfg.init == "config" else "student.checkpoint"
    student_config = read_model_config(str(Path(source).parent if source.endswith(".json") else source), key)
    if student_config.vocab_size != teacher_config.vocab_size:
        raise CodirError(
            f"{key}: student vocabulary size {student_config.vocab_size} differs from the teacher's "
            f"{teacher_config.vocab_size}: teacher and student must share one tokenizer"
        )
    return student_config


def check_same_tokenizer(teacher_source: str, student_source: str) -> None:
    """Raise if a student folder ships a tokenizer whose vocabulary differs from the teacher's."""
    if not any(Path(student_source, name).is_file() for name in ("tokenizer.json", "vocab.txt", "vocab.json")):
        return
    teacher_vocab = load_tokenizer(teacher_source, "teacher.path").get_vocab()
    student_vocab = load_tokenizer(student_source, "student.checkpoint").get_vocab()
    if teacher_vocab != student_vocab:
        differing = len(set(teacher_vocab.items()) ^ set(student_vocab.items()))
        raise CodirError(
            f"student.checkpoint: tokenizer of {student_source!r} differs from the teacher's "
            f"({len(student_vocab)} vs {len(teacher_vocab)} tokens, {differing} entries differ)"
        )


def build_student(
    cfg: StudentConfig, teacher_source: str, student_config: PretrainedConfig, layer_map: list[int], auto_class=AutoModelForMaskedLM, **load_options
):
    """The student (`auto_class`: masked-LM in stage 1, sequence classification in stage 2) with the
    architecture `student_config`, initialised as `cfg.init` says."""
    if cfg.init == "checkpoint":
        check_same_tokenizer(teacher_source, cfg.checkpoint)
        try:
            return auto_class.from_pretrained(cfg.checkpoint, config=student_config, **load_options)
        except (OSError, ValueError) as err:
            raise CodirError(f"student.checkpoint: cannot load {cfg.checkpoint!r}: {error_line(err)}") from None
    student = auto_class.from_config(student_config)
    if cfg.init == "teacher_layers":
        copy_teacher_layers(student, teacher_source, layer_map)
    return student


@torch.no_grad()
def copy_teacher_layers(student: PreTrainedModel, teacher_source: str, layer_map: list[int]) -> list[str]:
    """Copy embeddings, student layer i <- teacher layer layer_map[i-1], and any MLM head the teacher has.

    Teacher tensors are read one at a time from its checkpoint, so the whole teacher is never in memory.
    Returns the student tensor names that kept their random initialisation (e.g. a headless teacher's MLM head).
    """
    teacher = _checkpoint_tensors(teacher_source)
    prefix = student.base_model_prefix + "."
    body_layers = layer_list(student.base_model, student.config.num_hidden_layers)
    if body_layers is None:
        raise CodirError(f"student.init: teacher_layers needs one set of weights per layer; {student.config.model_type} has none")
    layers = re.compile(rf"^({re.escape(prefix + body_layers)}\.)(\d+)(\..*)$")
    state = student.state_dict()
    missing = []
    for name, target in state.items():
        source_name = _teacher_name(layers, name, layer_map)
        candidates = [source_name, source_name.removeprefix(prefix), prefix + source_name]
        found = next((c for c in candidates if c in teacher), None)
        if found is None:
            missing.append(name)
            continue
        tensor = teacher[found]()
        if tensor.shape != target.shape:
            raise CodirError(f"teacher tensor {found} has shape {tuple(tensor.shape)}, student expects {tuple(target.shape)}")
        target.copy_(tensor)
    not_copied = [n for n in missing if n.startswith(prefix) and ".pooler." not in n]  # a pooler may start fresh, as in from_pretrained
    if not_copied:
        raise CodirError(
            f"teacher checkpoint {teacher_source!r} lacks {len(not_copied)} body tensors the student needs "
            f"(first: {not_copied[0]}); it must be a {student.config.model_type} model of the student's width"
        )
    student.tie_weights()
    return missing


def _teacher_name(layers: re.Pattern, student_name: str, layer_map: list[int]) -> str:
    match = layers.match(student_name)
    if not match:
        return student_name
    return f"{match.group(1)}{layer_map[int(match.group(2))] - 1}{match.group(3)}"


def _checkpoint_tensors(source: str) -> dict[str, Callable[[], torch.Tensor]]:
    """name -> zero-argument loader, so a tensor is read only when asked for."""
    folder = Path(source)
    if not folder.is_dir():
        raise CodirError(f"teacher.path: {source!r} is not a local model folder (needed to read teacher weights)")
    tensors: dict[str, Callable[[], torch.Tensor]] = {}
    for file in _weight_files(folder):
        if file.suffix == ".safetensors":
            try:
                handle = safe_open(str(file), "pt")
            except Exception as err:  # safetensors raises its own error types for bad headers
                raise CodirError(f"corrupt weight file {file}: {err}") from None
            for name in handle.keys():
                tensors[name] = lambda h=handle, n=name: h.get_tensor(n)
        else:
            state = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
            for name in state:
                tensors[name] = lambda s=state, n=name: s[n]
    return tensors


def _weight_files(folder: Path) -> Iterator[Path]:
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = folder / index_name
        if index.is_file():
            yield from (folder / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values())))
            return
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (folder / single).is_file():
            yield folder / single
            return
    raise CodirError(f"no model.safetensors or pytorch_model.bin in {folder}")


def _looks_local(source: str) -> bool:
    return source.startswith((".", "/", "~")) or Path(source).exists() or source.count("/") != 1
