"""Typed run configuration: dataclasses loaded from JSON/YAML with dotted command-line overrides.

Every key and type is checked when the config is loaded, before any model or data is touched.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import io
import json
import math
import textwrap
import tokenize
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml

from .errors import CodirError, error_line


@dataclass
class TeacherConfig:
    path: str = ""  # local folder (or hub name where a network exists) of a BERT/RoBERTa-style model
    zero3: Literal["auto"] | bool = "auto"  # partition the frozen teacher across ranks (ZeRO-3 inference); auto: only a teacher too big to replicate


@dataclass
class StudentConfig:
    init: Literal["teacher_layers", "config", "checkpoint"] = "teacher_layers"  # build the student from teacher layers, a config, or a checkpoint
    num_layers: int = 0  # teacher_layers: student depth; 0 means half the teacher's depth
    config_path: str = ""  # init=config: a config.json (or folder) of a smaller model with the teacher's vocab
    checkpoint: str = ""  # init=checkpoint: a Hugging Face folder to start from


@dataclass
class CodirConfig:
    layer_map: list[int] | Literal["odd"] | None = None  # teacher layer (1-based) per student layer; None = uniform; odd = 1, 3, 5, ...
    pooling: Literal["mean", "cls"] = "mean"  # how a layer's token states become one vector: masked mean or [CLS]
    projection_dim: int = 128  # size of the projection the contrastive loss compares in
    temperature: float = 0.07  # InfoNCE temperature tau
    queue_length: int = 4096  # teacher features kept as negatives (FIFO across steps); 0 = in-batch negatives only


@dataclass
class TrainConfig:
    deepspeed_config: str = "auto"  # DeepSpeed JSON (its "auto" values filled from here); auto: the shipped one for this machine and world size
    micro_batch_size: int = 8  # samples per rank per forward pass
    gradient_accumulation_steps: int = 1  # micro-batches per optimizer step
    lr: float = 1e-4  # peak learning rate
    warmup_steps: int = 0  # learning-rate warm-up steps of the DeepSpeed scheduler
    max_steps: int = 1000  # optimizer steps of the run
    seed: int = 42  # seed of initialisation, data order and masking
    gradient_clipping: float = 1.0  # clip the gradient norm to this (0 = no clipping)
    comm_timeout_minutes: float = 30.0  # a collective waiting longer (a dead rank or node) fails the run
    compile: bool = False  # torch.compile the student and the teacher (pays off on long GPU runs: measure with bench/step_speed.py)


@dataclass
class LoggingConfig:
    RENAMED: ClassVar[dict[str, str]] = {"progress_bar": "removed: codir-ds prints one plain line every logging.every steps"}
    every: int = 10  # steps between TensorBoard scalars and log lines
    gradient_ratio: bool = False  # on logged steps, also the student's gradient norm of the weighted CoDIR/baseline term over the rest's
    tensorboard_dir: str = ""  # default: <output.dir>/tensorboard


@dataclass
class CheckpointConfig:
    every: int = 500  # steps between checkpoints; 0 disables periodic checkpoints
    dir: str = ""  # default: <output.dir>/checkpoints
    resume: str = "latest"  # "latest", "" (start fresh) or a tag such as step_500
    keep: int = 2  # most recent checkpoints kept on disk
    stop_file: str = ""  # creating or touching it after the start stops the run gracefully, like SIGUSR1; default <checkpoint dir>/STOP


@dataclass
class OutputConfig:
    dir: str = "runs/codir"  # run folder: config, logs, checkpoints and the exported student
    export: bool = True  # export the student as a Hugging Face folder at the end of the run
    overwrite: bool = False  # start fresh over another run's checkpoints: they are moved aside to <name>.old-<time>, not deleted


class RunPaths:
    """Where a run writes, derived from its `logging`, `checkpoint` and `output` sections."""

    @property
    def tensorboard_dir(self) -> Path:
        return Path(self.logging.tensorboard_dir or Path(self.output.dir) / "tensorboard")

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.checkpoint.dir or Path(self.output.dir) / "checkpoints")

    @property
    def export_dir(self) -> Path:
        return Path(self.output.dir) / "student"

    @property
    def stop_file(self) -> Path:
        return Path(self.checkpoint.stop_file or self.checkpoint_dir / "STOP")


def validate_models(teacher: TeacherConfig, student: StudentConfig) -> None:
    require(teacher.path, "teacher.path", "must name the teacher model folder")
    at_least(student.num_layers, 0, "student.num_layers")
    if student.init == "config":
        require(student.config_path, "student.config_path", "is needed with student.init=config")
    if student.init == "checkpoint":
        require(student.checkpoint, "student.checkpoint", "is needed with student.init=checkpoint")


def validate_codir(codir: CodirConfig) -> None:
    if isinstance(codir.layer_map, list):
        if not codir.layer_map:
            raise CodirError("codir.layer_map: must list at least one teacher layer (or be null)")
        for layer in codir.layer_map:
            at_least(layer, 1, "codir.layer_map")
    at_least(codir.projection_dim, 1, "codir.projection_dim")
    positive(codir.temperature, "codir.temperature")
    at_least(codir.queue_length, 0, "codir.queue_length")


def validate_run(train: TrainConfig, logging: LoggingConfig, checkpoint: CheckpointConfig) -> None:
    for name in ("micro_batch_size", "gradient_accumulation_steps"):
        at_least(getattr(train, name), 1, f"train.{name}")
    positive(train.lr, "train.lr")
    positive(train.comm_timeout_minutes, "train.comm_timeout_minutes")
    at_least(train.warmup_steps, 0, "train.warmup_steps")
    at_least(train.gradient_clipping, 0, "train.gradient_clipping")
    at_least(logging.every, 1, "logging.every")
    at_least(checkpoint.every, 0, "checkpoint.every")
    at_least(checkpoint.keep, 1, "checkpoint.keep")


def require(value: str, key: str, why: str) -> None:
    if not value:
        raise CodirError(f"{key}: {why}")


def at_least(value: float, low: float, key: str) -> None:
    if value < low:
        raise CodirError(f"{key}: {value} is below the minimum {low}")


def positive(value: float, key: str) -> None:
    if value <= 0:
        raise CodirError(f"{key}: {value} must be > 0")


C = typing.TypeVar("C")
BOOLEAN_WORDS = {"true": True, "false": False, "yes": True, "no": False}


def load_config(cls: type[C], path: str | None = None, overrides: dict[str, Any] | None = None, validate: bool = True) -> C:
    """Build `cls` from a JSON/YAML file plus dotted overrides (`{"codir.temperature": 0.05}`), validated
    unless `validate` is False (for a caller that derives another config from it and validates that)."""
    raw: dict[str, Any] = _read_file(Path(path)) if path else {}
    for dotted, value in (overrides or {}).items():
        _set_dotted(raw, dotted, value)
    config = _build(cls, raw, prefix="")
    if validate:
        config.validate()
    return config


def config_to_dict(config: Any) -> dict[str, Any]:
    """Plain nested dict of a config (for logging and saving beside checkpoints)."""
    return dataclasses.asdict(config)


def field_comments(cls: type) -> dict[str, str]:
    """The inline `# comment` of each field line (`name: type = default  # comment`) of `cls` and its bases,
    read from the source; a subclass's commented redefinition wins."""
    comments: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if "__annotations__" not in vars(klass):
            continue
        source = textwrap.dedent(inspect.getsource(klass))
        depth, line_depth, line = 0, 0, []  # indentation depth; that of the current logical line; its tokens
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            depth += {tokenize.INDENT: 1, tokenize.DEDENT: -1}.get(tok.type, 0)
            if tok.type in (tokenize.NEWLINE, tokenize.NL) and all(t.type == tokenize.COMMENT for t in line):
                line = []  # a blank or comment-only line
            elif tok.type == tokenize.NEWLINE:
                code = [t for t in line if t.type != tokenize.COMMENT]
                notes = [t.string.lstrip("#").strip() for t in line if t.type == tokenize.COMMENT]
                if line_depth == 1 and len(code) > 1 and code[0].type == tokenize.NAME and code[1].string == ":" and notes:
                    comments[code[0].string] = notes[0]
                line = []
            elif tok.type not in (tokenize.INDENT, tokenize.DEDENT, tokenize.NL):
                if not line:
                    line_depth = depth
                line.append(tok)
    return {name: comments[name] for name in (f.name for f in dataclasses.fields(cls)) if name in comments}


def config_help(cls: type) -> str:
    """Every key of config class `cls` by section: `section.key  type  default  meaning`, from the dataclasses."""
    rows: list[str | tuple[str, str, str, str]] = []  # a heading line, or (key, type, default, meaning)

    def walk(klass: type, instance: Any, prefix: str) -> None:
        hints, notes = typing.get_type_hints(klass), field_comments(klass)
        for f in dataclasses.fields(klass):
            hint, value, note = hints[f.name], getattr(instance, f.name), notes.get(f.name, "")
            if dataclasses.is_dataclass(hint):
                rows.append(f"\n{prefix}{f.name}" + (f": {note}" if note else ""))
                doc = inspect.getdoc(hint) or ""
                if doc and not doc.startswith(f"{hint.__name__}("):  # not the signature dataclass writes
                    rows.append("  " + " ".join(doc.split()))
                walk(hint, value, f"{prefix}{f.name}.")
            else:
                rows.append((f"  {prefix}{f.name}", type_name(hint), '""' if value == "" else str(value), note))

    walk(cls, cls(), "")
    keys = [row for row in rows if isinstance(row, tuple)]
    widths = [min(max(len(row[i]) for row in keys), cap) for i, cap in enumerate((36, 16, 14))]
    lines = [row if isinstance(row, str) else "".join(c.ljust(w) + "  " for c, w in zip(row, widths)) + row[3] for row in rows]
    return "\n".join(line.rstrip() for line in lines).lstrip("\n")


def type_name(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return "|".join(map(str, args))
    if origin in (typing.Union, types.UnionType):
        return "|".join(map(type_name, args))
    if origin is not None:
        return f"{origin.__name__}[{', '.join(map(type_name, args))}]"
    return "None" if hint is type(None) else getattr(hint, "__name__", str(hint))


def _read_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CodirError(f"config file not found: {path}")
    text = path.read_text()
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        raise CodirError(f"config file {path} does not parse: {error_line(err)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise CodirError(f"config file {path} must hold a mapping of sections, not {type(data).__name__}")
    return data


def _set_dotted(raw: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = raw
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise CodirError(f"{dotted}: '{part}' is a value, not a section")
    node[leaf] = value


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise CodirError(f"{prefix.rstrip('.') or 'config'}: expected a section (mapping), got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    renamed = getattr(cls, "RENAMED", {})
    for key in raw:
        if key in renamed:
            raise CodirError(f"config key '{prefix}{key}' is no more: {renamed[key]}")
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; valid keys: {', '.join(names)}"
            raise CodirError(f"unknown config key '{prefix}{key}'{hint}")
    values = {}
    for name in names:
        if name not in raw:
            continue
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            values[name] = _build(hint, raw[name], f"{prefix}{name}.")
        else:
            values[name] = _coerce(raw[name], hint, f"{prefix}{name}")
    return cls(**values)


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check `value` against a type hint; ints are accepted for floats, a lone string for list[str]."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options, errors = [a for a in args if a is not type(None)], []
        for option in options:  # the first that takes the value, e.g. "auto" before a bool
            try:
                return _coerce(value, option, key)
            except CodirError as err:
                errors.append(err)
        lists = [err for err, option in zip(errors, options) if typing.get_origin(option) is list]
        if len(options) == 1 or (isinstance(value, list) and lists):  # a list says what is wrong inside it
            raise (errors[0] if len(options) == 1 else lists[0])
        raise CodirError(f"{key}: {value!r} is neither {' nor '.join(type_name(a) for a in options)}")
    if origin is Literal:
        if value not in args:
            raise CodirError(f"{key}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if origin is list:
        if isinstance(value, str) and value.startswith("[") and value.endswith("]"):  # `--data.files=[a.txt,b.txt]`
            value = [item.strip().strip("'\"") for item in value[1:-1].split(",") if item.strip()]
        if isinstance(value, str) and args[0] is str:
            value = [value]
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise CodirError(f"{key}: expected a list, got {value!r}")
        return [_coerce(item, args[0], key) for item in value]
    if hint is bool and isinstance(value, str) and value.lower() in BOOLEAN_WORDS:  # fire keeps `--x=true` a string
        return BOOLEAN_WORDS[value.lower()]
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise CodirError(f"{key}: {value} is not a finite number")
        return float(value)
    if hint is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # fire parses `--checkpoint.resume=500` as an int
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise CodirError(f"{key}: expected {hint.__name__}, got {type(value).__name__} {value!r}")
    return value
