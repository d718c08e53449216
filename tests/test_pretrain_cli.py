"""`launch/pretrain.py` as a user runs it (one process): bad input gives one line and exit code 2."""

import re
import shutil
import subprocess
import sys

import pytest
from helpers import REPO, child_env, tensorboard_scalars, write_corpus, write_run_config

from codir_ds.models.ds_config import load_ds_config
from codir_ds.runtime.config import TrainConfig
from codir_ds.runtime.errors import CodirError


def pretrain(config, *overrides):
    command = [sys.executable, str(REPO / "launch/pretrain.py"), f"--config={config}", *overrides]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=REPO, env=child_env())


def one_line_error(result) -> str:
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("codir-ds: error:")]
    assert len(errors) == 1, result.stderr[-2000:]
    return errors[0].removeprefix("codir-ds: error: ")


@pytest.fixture
def config(tmp_path, tiny_teacher):
    return write_run_config(tmp_path, tiny_teacher, write_corpus(tmp_path / "corpus.txt"), train={"max_steps": 3})


def test_unknown_override_key(config):
    assert one_line_error(pretrain(config, "--codir.queue_lenght=8")) == (
        "unknown config key 'codir.queue_lenght'; did you mean 'codir.queue_length'?"
    )


def test_missing_corpus(config, tmp_path):
    message = one_line_error(pretrain(config, f"--data.files={tmp_path / 'nope.txt'}"))
    assert message == f"prepare: no such file {tmp_path / 'nope.txt'}"


def test_corrupt_corpus(config, tmp_path):
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 definitely not parquet")
    assert one_line_error(pretrain(config, f"--data.files={tmp_path / 'bad.parquet'}")).startswith(f"prepare: cannot read {tmp_path / 'bad.parquet'}")


@pytest.mark.parametrize(
    "ds_text, expected",
    [
        (None, "train.deepspeed_config: no such file"),
        ("{oops", "is not valid JSON"),
        ('{"zero_optimization": {"stage": 5}}', "zero_optimization.stage is 5; use 0, 1, 2 or 3"),
        ('{"optimizer": {"type": "AdamW", "params": {"lr": "auto", "eps": "auto"}}}', 'has "auto" for optimizer.params.eps'),
    ],
)
def test_bad_deepspeed_config(tmp_path, ds_text, expected):
    ds_path = tmp_path / "ds.json"
    if ds_text is not None:
        ds_path.write_text(ds_text)
    with pytest.raises(CodirError, match=re.escape(expected)):
        load_ds_config(TrainConfig(deepspeed_config=str(ds_path)), world_size=1)


def test_a_deepspeed_key_deepspeed_rejects_is_one_line(config, tmp_path):
    ds_path = tmp_path / "ds.json"
    ds_path.write_text('{"zero_optimization": {"stage": 2, "not_a_zero_key": 1}}')
    assert "train.deepspeed_config" in one_line_error(pretrain(config, f"--train.deepspeed_config={ds_path}"))


def test_missing_crashed_and_corrupt_checkpoints(config, tmp_path):
    assert "checkpoint.resume: no checkpoint 'step_99'" in one_line_error(pretrain(config, "--checkpoint.resume=step_99"))

    first = pretrain(config, "--output.export=False")
    assert first.returncode == 0, first.stderr[-3000:]
    checkpoints = tmp_path / "out/checkpoints"
    assert (checkpoints / "latest").read_text() == "step_3"

    debris = checkpoints / "step_5.partial"  # what a crash in the middle of a save leaves behind
    debris.mkdir()
    (debris / "rank_0.json").write_bytes(b"half a file")
    second = pretrain(config, "--train.max_steps=4", "--output.export=False")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from step_3" in second.stdout
    assert (checkpoints / "latest").read_text() == "step_4"

    rank_state = checkpoints / "step_4/rank_0.safetensors"
    rank_state.write_bytes(rank_state.read_bytes()[:100])  # truncated on disk
    assert one_line_error(pretrain(config, "--train.max_steps=5")) == (
        f"corrupt checkpoint {checkpoints / 'step_4'}: rank_0.safetensors: SafetensorError: Error while deserializing header: invalid header length; "
        "resume from step_3, the newest complete checkpoint, with --checkpoint.resume=step_3"
    )

    narrow = pretrain(config, f"--output.dir={tmp_path / 'narrow'}", "--codir.projection_dim=8", "--train.max_steps=1", "--output.export=False")
    assert narrow.returncode == 0, narrow.stderr[-3000:]
    shutil.copytree(tmp_path / "narrow/checkpoints/step_1", checkpoints / "step_1")  # another run's checkpoint, put among this run's
    assert one_line_error(pretrain(config, "--checkpoint.resume=step_1", "--train.max_steps=5")) == (
        f"checkpoint {checkpoints / 'step_1'} holds a model of other shapes than this run builds (size mismatch for codir.heads.student.weight: "
        "copying a param with shape torch.Size([8, 64]) from checkpoint, the shape in current model is torch.Size([16, 64])); resume with "
        "the model settings it was written with; resume from step_4, the newest complete checkpoint, with --checkpoint.resume=step_4"
    )


def test_headless_teacher_turns_kd_off_with_a_notice(tmp_path, headless_teacher):
    config = write_run_config(tmp_path, headless_teacher, write_corpus(tmp_path / "corpus.txt"), train={"max_steps": 2}, loss={"kd": 0.5})
    result = pretrain(config)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "has no trained MLM head; logit KD is off (loss.kd 0.5 -> 0)" in result.stdout
    scalars = tensorboard_scalars(tmp_path / "out/tensorboard")
    assert "loss/kd" not in scalars
    assert len(scalars["loss/codir"]) == 2
