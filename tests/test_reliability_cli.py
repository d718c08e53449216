"""Reliability as a user meets it, with real processes: a rerun never silently reuses or destroys a run, a
full disk during a save is one line, a non-finite loss stops the run, Ctrl-C checkpoints, one run per folder.
(A second Ctrl-C is tested in-process in test_preemption.py: its timing against the first is not repeatable here.)"""

from __future__ import annotations

import json
import resource
import shutil
import signal
import stat
import subprocess
import sys

import pytest
from helpers import REPO, child_env, write_corpus, write_run_config
from test_pretrain_cli import one_line_error, pretrain


@pytest.fixture
def config(tmp_path, tiny_teacher):
    return write_run_config(tmp_path, tiny_teacher, write_corpus(tmp_path / "corpus.txt"), train={"max_steps": 3})


def test_a_rerun_never_silently_reuses_or_destroys_the_run(config, tmp_path, headless_teacher):
    out = tmp_path / "out"
    first = pretrain(config)
    assert first.returncode == 0, first.stderr[-3000:]
    exported = (out / "student/model.safetensors").read_bytes()

    full = run_with_a_full_disk(config, "--train.max_steps=4")
    assert full.startswith(f"checkpoint step_4 could not be written to {out / 'checkpoints'} (")
    assert full.endswith("'latest' still names step_3; free disk space and run the same command again to resume")
    assert (out / "checkpoints/latest").read_text() == "step_3"
    assert not list((out / "checkpoints").glob("*.partial"))

    other = one_line_error(pretrain(config, f"--teacher.path={headless_teacher}", "--train.lr=0.1"))
    assert other.startswith(f"step_3 in {out / 'checkpoints'} was trained with other settings (")
    assert "teacher.path: " in other
    assert "train.lr: 0.002 -> 0.1" in other

    beyond = one_line_error(pretrain(config, "--train.max_steps=2"))
    assert beyond.startswith("step_3 in ")
    assert "is at step 3, beyond train.max_steps=2" in beyond

    fresh = one_line_error(pretrain(config, "--checkpoint.resume="))
    assert "holds another run's checkpoints" in fresh
    assert "--output.overwrite=true" in fresh

    first_export = {path.name: path.read_bytes() for path in (out / "student").iterdir()}
    shutil.rmtree(out / "student")
    again = pretrain(config)  # the same settings: nothing to train, said so, and the deleted export written again
    assert again.returncode == 0, again.stderr[-3000:]
    assert "nothing to train: step_3 is at step 3" in again.stdout
    assert {path.name: path.read_bytes() for path in (out / "student").iterdir()} == first_export
    assert {"model.safetensors", "config.json", "README.md"} <= set(first_export)

    over = pretrain(config, "--checkpoint.resume=", "--output.overwrite=true", "--train.max_steps=2", "--checkpoint.every=1")
    assert over.returncode == 0, over.stderr[-3000:]
    (moved,) = out.glob("checkpoints.old-*")
    assert (moved / "step_3").is_dir()  # the old run, moved aside whole
    assert (next(out.glob("student.old-*")) / "model.safetensors").read_bytes() == exported
    assert (out / "checkpoints/latest").read_text() == "step_2"
    assert (out / "checkpoints/step_2").is_dir()  # not pruned by the old, higher-numbered checkpoints
    weights = out / "student/model.safetensors"
    assert weights.stat().st_mode & stat.S_IROTH  # readable to the team sharing the folder (umask 022)


def run_with_a_full_disk(config, *overrides) -> str:
    """The one-line error of a run in which every file larger than 64 KiB fails to write, as on a full disk."""

    def small_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))

    command = [sys.executable, str(REPO / "launch/pretrain.py"), f"--config={config}", *overrides]
    return one_line_error(subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=child_env(), timeout=300, preexec_fn=small_files))


def test_a_non_finite_loss_stops_at_that_step_and_latest_stays_good(config, tmp_path):
    # lr 0 for the first step (log warm-up), then 1e12: the third step's loss overflows
    result = pretrain(config, "--train.lr=1e12", "--train.warmup_steps=3", "--train.max_steps=8", "--checkpoint.every=1")
    message = one_line_error(result)
    step = int(message.split(":")[0].removeprefix("step "))
    assert message.startswith(f"step {step}: loss/")
    assert "on at least one rank, the run stops" in message
    assert f"'latest' still names step_{step - 1}, the last good checkpoint" in message
    assert (tmp_path / "out/checkpoints/latest").read_text() == f"step_{step - 1}"
    assert not (tmp_path / "out/checkpoints" / f"step_{step}").exists()


def start(config, *overrides):
    command = [sys.executable, str(REPO / "launch/pretrain.py"), f"--config={config}", *overrides]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=child_env())


def wait_for_step(process, step: int) -> None:
    """Read the run's output until it logs `step`."""
    for line in process.stdout:
        if line.startswith(f"codir-ds: step {step}/"):
            return
    raise AssertionError(process.stderr.read()[-3000:])


def test_ctrl_c_checkpoints_one_run_per_folder_and_a_dead_runs_lock_is_taken_over(config, tmp_path):
    long = ("--train.max_steps=100000", "--checkpoint.every=0", "--logging.every=1")
    run = start(config, *long)
    wait_for_step(run, 2)
    second = one_line_error(pretrain(config, *long))
    assert "is in use by another run (host " in second
    assert f"pid {run.pid}" in second

    run.send_signal(signal.SIGINT)
    out, err = run.communicate(timeout=120)
    assert run.returncode == 75, err[-3000:]
    stopped = int((tmp_path / "out/checkpoints/latest").read_text().split("_")[1])
    assert f"stopped at step {stopped} on SIGINT" in out

    killed = start(config, *long)
    wait_for_step(killed, stopped + 1)
    killed.kill()  # kill -9: its lock stays behind
    killed.communicate(timeout=60)
    assert json.loads((tmp_path / "out/codir.lock").read_text())["pid"] == killed.pid
    resumed = pretrain(config, f"--train.max_steps={stopped + 1}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "taking over the lock of a run that is gone" in resumed.stdout
    assert f"resumed from step_{stopped}" in resumed.stdout
    assert not (tmp_path / "out/codir.lock").exists()
