"""`--help` of the launch scripts and of `codir-ds`: every config key with its type, default and meaning,
generated from the config dataclasses and the comments on their field lines."""

from __future__ import annotations

import dataclasses
import inspect
import subprocess
import sys
import typing
from dataclasses import dataclass, field
from typing import ClassVar

import pytest
from helpers import REPO, child_env

from codir_ds import cli
from codir_ds.finetune.config import FinetuneConfig
from codir_ds.pretrain.config import PretrainConfig
from codir_ds.runtime.config import field_comments


def run_help(*args: str) -> str:
    result = subprocess.run([sys.executable, *args], cwd=REPO, env=child_env(PYTHONPATH=str(REPO)), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return result.stdout


def leaf_defaults(config, prefix: str = "") -> dict[str, object]:
    """`section.key` -> default of every leaf key of a config instance."""
    leaves = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            leaves.update(leaf_defaults(value, f"{prefix}{f.name}."))
        else:
            leaves[f"{prefix}{f.name}"] = value
    return leaves


def key_lines(text: str) -> dict[str, str]:
    return {line.split()[0]: line for line in text.splitlines() if line.startswith("  ") and line.split()}


def section_classes() -> set[type]:
    found, todo = set(), [PretrainConfig, FinetuneConfig]
    while todo:
        cls = todo.pop()
        found.add(cls)
        todo += [hint for hint in typing.get_type_hints(cls).values() if dataclasses.is_dataclass(hint)]
    return found


@pytest.mark.parametrize("script, cls", [("launch/pretrain.py", PretrainConfig), ("launch/finetune.py", FinetuneConfig)])
def test_launch_help_lists_every_key_with_its_default(script, cls):
    text = run_help(script, "--help")
    assert text.startswith(f"usage: {script} ")
    lines = key_lines(text)
    for key, default in leaf_defaults(cls()).items():
        assert key in lines, f"{key} missing from {script} --help"
        shown = '""' if default == "" else str(default)
        assert shown in lines[key].split(), f"{key}: default {shown} not in {lines[key]!r}"
    assert lines["codir.temperature"].split() == ["codir.temperature", "float", "0.07", "InfoNCE", "temperature", "tau"]
    assert "mean|cls" in lines["codir.pooling"].split()  # a Literal prints its choices
    assert "RENAMED" not in text
    assert "progress_bar" not in text


def test_finetune_help_uses_inherited_and_redefined_comments():
    text = run_help("launch/finetune.py", "teacher", "-h")
    assert text.startswith("usage: launch/finetune.py [distill|teacher] ")
    lines = key_lines(text)
    assert lines["teacher.path"].endswith("of a BERT/RoBERTa-style model")  # inherited from TeacherConfig
    assert lines["teacher.live"].split()[:3] == ["teacher.live", "bool", "False"]  # FinetuneTeacherConfig's own
    assert lines["student.init"].split()[2:] == ["checkpoint", "stage", "2", "starts", "from", "the", "stage-1", "export"]
    assert lines["output.dir"].split()[2] == "runs/finetune"  # the default FinetuneConfig builds, not OutputConfig's


def test_codir_ds_help_for_every_command(capsys, monkeypatch):
    assert "--tokenizer" in run_help("-m", "codir_ds", "prepare", "--help")
    monkeypatch.setattr(sys, "argv", ["codir-ds", "--help"])
    cli.main()
    listing = capsys.readouterr().out
    commands = ["prepare", "pretrain", "finetune", "export", "demo", "demo_finetune", "report"]
    for name in commands:
        assert f"\n  {name} " in listing
        monkeypatch.setattr(sys, "argv", ["codir-ds", name, "-h"])
        cli.main()  # help returns (exit 0) without running anything
        text = capsys.readouterr().out
        assert text.startswith(f"usage: codir-ds {name}")
        assert inspect.getdoc(getattr(cli, name)).splitlines()[0] in text


def test_every_config_field_has_a_comment():
    for cls in section_classes():
        comments = field_comments(cls)
        missing = [f.name for f in dataclasses.fields(cls) if not comments.get(f.name)]
        assert not missing, f"{cls.__name__}: add a `# meaning` comment to field(s) {missing}"


@dataclass
class _Base:
    RENAMED: ClassVar[dict[str, str]] = {"old": "gone"}  # not a field
    a: int = 1  # base a
    # a comment-only line belongs to no field
    b: list[int] = field(
        default_factory=list,
    )  # b, after a bracketed continuation

    def method(self) -> int:
        c: int = 2  # a local, not a field
        return c


@dataclass
class _Child(_Base):
    a: int = 3  # child a
    b: list[int] = field(default_factory=list)


def test_field_comments_walks_bases_and_lets_a_redefinition_win():
    assert field_comments(_Child) == {"a": "child a", "b": "b, after a bracketed continuation"}
