"""Reliability, in-process: checkpoint state without pickles, names confined to the checkpoint folder, clear lines for
damaged checkpoints, pruning, durable folder replacement, run identity, the run lock, config and DeepSpeed-config
checks, task labels, export refusals, and the contrastive mask of an anchor's own example."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys

import pytest
import torch
from helpers import write_tokenizer
from safetensors.torch import save_file

from codir_ds.finetune.config import TaskConfig
from codir_ds.finetune.data import load_task_data, resolve_task
from codir_ds.method.losses import contrastive_logits
from codir_ds.models.ds_config import load_ds_config
from codir_ds.pretrain.config import PretrainConfig
from codir_ds.runs.checkpoint import _prune, find_resume, load_checkpoint
from codir_ds.runs.export import export_student
from codir_ds.runs.run_folder import RunLock, _require_same_identity, run_identity, weight_sample
from codir_ds.runs.state_files import load_state, save_state
from codir_ds.runtime import files
from codir_ds.runtime.config import TrainConfig, load_config
from codir_ds.runtime.errors import CodirError


def checkpoint(directory, tag, step, ranks=1):
    """A checkpoint folder as codir-ds leaves it, without the DeepSpeed files (enough for what is read first)."""
    for r in range(ranks):
        (directory / tag).mkdir(parents=True, exist_ok=True)
        save_state({"step": step, "queue": {"features": torch.ones(2, 3)}}, directory / tag / f"rank_{r}")
    return directory / tag


class RunsCode:
    """Unpickling this creates a file: the proof that loading ran code."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_rank_state_round_trips_without_pickle(tmp_path):
    state = {"step": 7, "rng": {"python": (3, (1, 2, 3), None)}, "queue": {"features": torch.arange(6.0).view(2, 3), "pointer": 1}, "best": {}}
    save_state(state, tmp_path / "rank_0")
    loaded = load_state(tmp_path / "rank_0")
    assert loaded["step"] == 7
    assert loaded["rng"]["python"] == [3, [1, 2, 3], None]
    assert torch.equal(loaded["queue"]["features"], state["queue"]["features"])
    assert json.loads((tmp_path / "rank_0.json").read_text())["queue"]["features"] == {"__tensor__": "state.queue.features"}


def test_a_pickled_rank_file_is_refused_unopened(tmp_path):
    marker = tmp_path / "code_ran"
    folder = tmp_path / "step_3"
    folder.mkdir()
    (folder / "rank_0.pt").write_bytes(pickle.dumps({"step": RunsCode(str(marker))}))
    (tmp_path / "latest").write_text("step_3")
    with pytest.raises(CodirError, match="pickled rank_"):
        find_resume(tmp_path, "latest")
    assert not marker.exists()


@pytest.mark.parametrize("resume", ["../elsewhere", "/etc", "step_3/../../x", ".hidden"])
def test_resume_names_stay_inside_the_checkpoint_folder(tmp_path, resume):
    (tmp_path / "elsewhere").mkdir()
    with pytest.raises(CodirError, match="is not a checkpoint name"):
        find_resume(tmp_path / "checkpoints", resume)


def test_latest_naming_a_path_outside_is_refused(tmp_path):
    checkpoint(tmp_path, "step_3", 3)
    (tmp_path / "latest").write_text("../../etc")
    with pytest.raises(CodirError, match=r"does not name a checkpoint.*--checkpoint.resume=step_3"):
        find_resume(tmp_path, "latest")


def test_garbage_in_latest_is_one_line_with_what_to_do(tmp_path):
    checkpoint(tmp_path, "step_3", 3)
    (tmp_path / "latest").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(CodirError, match=r"resume from step_3, the newest complete checkpoint, with --checkpoint.resume=step_3"):
        find_resume(tmp_path, "latest")


def test_latest_naming_a_missing_folder_says_what_to_resume_from(tmp_path):
    checkpoint(tmp_path, "step_3", 3)
    (tmp_path / "latest").write_text("step_6")
    with pytest.raises(CodirError) as caught:
        find_resume(tmp_path, "latest")
    assert str(caught.value) == (
        f"{tmp_path / 'latest'} names step_6, which is not in {tmp_path}; resume from step_3, the newest complete checkpoint, "
        "with --checkpoint.resume=step_3"
    )


def test_a_deleted_rank_file_is_incomplete_not_zero_ranks(tmp_path):
    checkpoint(tmp_path, "step_3", 3)
    (checkpoint(tmp_path, "step_6", 6, ranks=2) / "rank_1.safetensors").unlink()
    (tmp_path / "latest").write_text("step_6")
    with pytest.raises(CodirError) as caught:
        find_resume(tmp_path, "latest")
    assert str(caught.value) == (
        f"checkpoint {tmp_path / 'step_6'} is incomplete (no rank_1.json/.safetensors); resume from step_3, the newest "
        "complete checkpoint, with --checkpoint.resume=step_3"
    )


def test_a_truncated_state_file_is_corrupt_and_names_what_to_resume_from(tmp_path):
    checkpoint(tmp_path, "step_3", 3)
    state = checkpoint(tmp_path, "step_6", 6) / "rank_0.safetensors"
    state.write_bytes(state.read_bytes()[:60])  # truncated on disk
    with pytest.raises(CodirError) as caught:
        load_checkpoint(None, tmp_path, find_resume(tmp_path, "step_6"))  # fails before the engine is touched
    assert str(caught.value) == (
        f"corrupt checkpoint {tmp_path / 'step_6'}: rank_0.safetensors: SafetensorError: Error while deserializing header: invalid header length; "
        "resume from step_3, the newest complete checkpoint, with --checkpoint.resume=step_3"
    )


def test_pruning_keeps_the_new_checkpoint_and_never_touches_higher_numbers(tmp_path):
    for step in (3, 6, 0, 1, 2):  # step_3, step_6 left by a run this one resumed from an earlier tag
        checkpoint(tmp_path, f"step_{step}", step)
    _prune(tmp_path, keep=2, protect="step_2")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_1", "step_2", "step_3", "step_6"]


def test_a_folder_replacement_that_died_midway_is_recovered(tmp_path):
    (tmp_path / "best.partial").mkdir()
    (tmp_path / "best.partial/weights").write_text("new")
    (tmp_path / "best").mkdir()
    (tmp_path / "best/weights").write_text("old")
    files.publish(tmp_path / "best.partial", tmp_path / "best")
    assert (tmp_path / "best/weights").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]

    os.replace(tmp_path / "best", tmp_path / "best.replaced")  # a crash between publish's two renames
    files.recover(tmp_path)
    assert (tmp_path / "best/weights").read_text() == "new"


def pretrain_config(teacher, **overrides):
    return load_config(PretrainConfig, overrides={"teacher.path": str(teacher), "data.files": ["corpus.txt"], **overrides})


def identity(cfg, **extra):
    ds = load_ds_config(cfg.train, world_size=1)
    return run_identity(cfg, ds, {"layer_map": [2, 4], **extra})


def test_run_identity_ignores_the_budget_and_cadence_and_names_what_changed(tmp_path, tiny_teacher):
    base = identity(pretrain_config(tiny_teacher))
    same = identity(pretrain_config(tiny_teacher, **{"train.max_steps": 9, "checkpoint.every": 1, "logging.every": 3, "output.dir": "x"}))
    assert same == base
    (tmp_path / "run.json").write_text(json.dumps({"identity": base}))
    changed = identity(pretrain_config(tiny_teacher, **{"train.lr": 0.1, "codir.temperature": 0.2}))
    with pytest.raises(CodirError) as caught:
        _require_same_identity(tmp_path, changed, find_resume_stub())
    message = str(caught.value)
    assert "codir.temperature: 0.07 -> 0.2" in message
    assert "train.lr: 0.0001 -> 0.1" in message
    assert "deepspeed.optimizer" in message  # the resolved lr, through the DeepSpeed config


def test_a_teacher_with_other_weights_is_another_run_wherever_it_lies(tmp_path, tiny_teacher, headless_teacher):
    base = identity(pretrain_config(tiny_teacher))
    (tmp_path / "run.json").write_text(json.dumps({"identity": base}))
    with pytest.raises(CodirError, match=r"teacher.path: .* -> .*"):
        _require_same_identity(tmp_path, identity(pretrain_config(headless_teacher)), find_resume_stub())
    moved = tmp_path / "moved_teacher"
    moved.symlink_to(tiny_teacher, target_is_directory=True)
    _require_same_identity(tmp_path, identity(pretrain_config(moved)), find_resume_stub())  # same files: same run


def test_a_large_teacher_retrained_or_swapped_in_place_is_another_run(tmp_path, tiny_teacher):
    """Weight files above the size read whole (6 MB here) enter by content too, at a bounded read."""
    teacher, copy = tmp_path / "teacher", tmp_path / "copy"
    weights = torch.randn(1_500_000, generator=torch.Generator().manual_seed(0))

    def save_teacher(folder, tensor):
        folder.mkdir(exist_ok=True)
        shutil.copy(tiny_teacher / "config.json", folder)
        save_file({"weight": tensor}, str(folder / "model.safetensors"))

    save_teacher(teacher, weights)
    save_teacher(copy, weights)
    (tmp_path / "run.json").write_text(json.dumps({"identity": identity(pretrain_config(teacher))}))
    _require_same_identity(tmp_path, identity(pretrain_config(copy)), find_resume_stub())  # the same weights elsewhere
    file_size = (teacher / "model.safetensors").stat().st_size
    assert file_size > 5.5 * 2**20
    assert len(weight_sample(teacher / "model.safetensors")) < 4.1 * 2**20

    for changed in (weights + 1e-3 * torch.randn(weights.shape), torch.randn(weights.shape)):  # retrained; other weights of one shape
        save_teacher(teacher, changed)
        assert (teacher / "model.safetensors").stat().st_size == file_size
        with pytest.raises(CodirError, match=r"\(teacher.path: \.\.\.\S*/teacher \((\w{12})\) -> \.\.\.\S*/teacher \((?!\1)\w{12}\)\);"):
            _require_same_identity(tmp_path, identity(pretrain_config(teacher)), find_resume_stub())


def find_resume_stub():
    from codir_ds.runs.checkpoint import Resume

    return Resume("step_3", world=1, step=3)


def test_a_second_run_in_a_folder_is_refused_naming_the_holder(tmp_path):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"from codir_ds.runs.run_folder import RunLock; RunLock({str(tmp_path)!r}).acquire(); print('held', flush=True); input()",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "SLURM_JOB_ID": ""},
    )
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(CodirError, match=rf"is in use by another run \(host .*, pid {holder.pid}, since"):
            RunLock(tmp_path).acquire()
    finally:
        holder.communicate("\n", timeout=30)
    lock = RunLock(tmp_path)  # the holder is gone (it never released: as after kill -9): taken over
    lock.acquire()
    assert json.loads((tmp_path / "codir.lock").read_text())["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / "codir.lock").exists()


def test_a_lock_on_another_host_is_respected_and_a_requeued_job_takes_its_own_back(tmp_path, monkeypatch):
    (tmp_path / "codir.lock").write_text(json.dumps({"host": "node-17", "pid": 4, "slurm_job": "77", "since": "then"}))
    with pytest.raises(CodirError, match="host node-17, pid 4, SLURM job 77"):
        RunLock(tmp_path).acquire()
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    lock = RunLock(tmp_path)
    lock.acquire()
    assert json.loads((tmp_path / "codir.lock").read_text())["slurm_job"] == "77"
    lock.release()


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_config_values_are_rejected(tiny_teacher, value):
    with pytest.raises(CodirError, match=f"codir.temperature: {value} is not a finite number"):
        pretrain_config(tiny_teacher, **{"codir.temperature": value})


def deepspeed_file(tmp_path, content):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(content))
    return str(path)


@pytest.mark.parametrize(
    "content, message",
    [
        ({"optimizer": {"type": "AdamW", "params": {"lr": 0.5}}}, "sets optimizer.params.lr to 0.5 but the run config has train.lr = 0.002"),
        ({"gradient_accumulation_steps": 4}, "sets gradient_accumulation_steps to 4 but the run config has train.gradient_accumulation_steps = 1"),
        ({"gradient_clipping": 5.0}, "sets gradient_clipping to 5.0 but the run config has train.gradient_clipping = 1.0"),
        ({"scheduler": {"type": "WarmupDecayLR", "params": {"total_num_steps": 50}}}, "sets scheduler.params.total_num_steps to 50"),
    ],
)
def test_a_deepspeed_value_that_conflicts_with_the_run_config_is_one_line(tmp_path, content, message):
    train = TrainConfig(deepspeed_config=deepspeed_file(tmp_path, content), lr=0.002, max_steps=10)
    with pytest.raises(CodirError, match=message):
        load_ds_config(train, world_size=1)


def test_deepspeed_values_equal_to_the_run_config_or_auto_pass(tmp_path):
    content = {"optimizer": {"type": "AdamW", "params": {"lr": 0.002}}, "gradient_accumulation_steps": "auto", "train_micro_batch_size_per_gpu": 8}
    config = load_ds_config(TrainConfig(deepspeed_config=deepspeed_file(tmp_path, content), lr=0.002), world_size=2)
    assert config["optimizer"]["params"]["lr"] == 0.002
    assert config["train_batch_size"] == 16
    assert config["gradient_clipping"] == 1.0


def task_files(tmp_path, rows):
    train = tmp_path / "train.csv"
    train.write_text("text,label\n" + "".join(f"{text},{label}\n" for text, label in rows))
    return TaskConfig(name="custom", train_file=str(train), dev_files=[str(train)])


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return write_tokenizer(tmp_path_factory.mktemp("tokenizer"))


def test_empty_label_cells_are_an_error_naming_the_examples(tmp_path, tokenizer):
    cfg = task_files(tmp_path, [("the a", 0), ("of and", 1), ("to in", ""), ("is was", 1)])
    with pytest.raises(CodirError, match=r"has 1 example\(s\) without a label \(example 3, counted from 1\)"):
        load_task_data(resolve_task(cfg), tokenizer, 16)


def test_unlabelled_examples_can_be_dropped_and_integer_labels_stay_integers(tmp_path, tokenizer, capsys):
    cfg = task_files(tmp_path, [("the a", 0), ("of and", 1), ("to in", ""), ("is was", 1)])
    data = load_task_data(resolve_task(cfg), tokenizer, 16, drop_unlabelled=True)
    assert data.task.labels == ("0", "1")  # not '0.0', '1.0', 'None'
    assert data.train["label"] == [0, 1, 1]
    assert "left out 1 example(s) without a label" in capsys.readouterr().out


def test_a_single_class_training_set_is_refused_before_training(tmp_path, tokenizer):
    cfg = task_files(tmp_path, [("the a", "pos"), ("of and", "pos")])
    with pytest.raises(CodirError, match="has label 'pos'; a classifier needs at least two classes"):
        load_task_data(resolve_task(cfg), tokenizer, 16)


def test_empty_text_cells_are_counted(tmp_path, tokenizer, capsys):
    cfg = task_files(tmp_path, [("the a", 0), ("", 1), ("is was", 1)])
    load_task_data(resolve_task(cfg), tokenizer, 16)
    assert "empty text cells (1 in column 'text')" in capsys.readouterr().out


@pytest.fixture
def spec_only(tmp_path):
    (tmp_path / "checkpoints/student_spec").mkdir(parents=True)
    return tmp_path / "checkpoints"


def test_export_refuses_a_file_and_a_non_empty_folder(tmp_path, spec_only):
    (tmp_path / "a_file").write_text("mine")
    with pytest.raises(CodirError, match="a_file is a file"):
        export_student(spec_only, tmp_path / "a_file")
    (tmp_path / "full").mkdir()
    (tmp_path / "full/keep.txt").write_text("mine")
    with pytest.raises(CodirError, match="full is not empty; name a new folder, or pass --overwrite=true"):
        export_student(spec_only, tmp_path / "full")
    with pytest.raises(CodirError, match="'../x' is not a checkpoint name"):
        export_student(spec_only, tmp_path / "new", tag="../x")
    assert (tmp_path / "full/keep.txt").read_text() == "mine"


@pytest.mark.parametrize("zero", [False, True], ids=["stage0", "zero"])
def test_export_refuses_a_model_file_that_would_run_code_and_runs_none_of_it(tmp_path, spec_only, zero):
    marker = tmp_path / "code_ran"
    folder = spec_only / "step_1"
    folder.mkdir()
    torch.save({"module": {"student.weight": torch.zeros(2)}, "trap": RunsCode(str(marker))}, folder / "mp_rank_00_model_states.pt")
    if zero:  # DeepSpeed's own loader (zero_to_fp32) reads this folder
        torch.save({"optimizer_state_dict": {"zero_stage": 2}}, folder / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    with pytest.raises(CodirError) as caught:
        export_student(spec_only, tmp_path / "student", tag="step_1")
    assert not marker.exists()
    assert str(caught.value) == (
        f"export: {folder / 'mp_rank_00_model_states.pt'} would run code when unpickled (it names io.open, neither a tensor nor "
        "DeepSpeed's own state); it was not loaded: export only checkpoints you trust"
    )
    assert not (tmp_path / "student").exists()


def test_the_anchors_own_example_is_never_its_negative():
    anchors = torch.nn.functional.normalize(torch.randn(2, 4), dim=1)
    candidates = torch.cat([anchors, anchors])  # in-batch rows, then the queue: last epoch's copies of the same examples
    ids = torch.tensor([5, 9])
    logits = contrastive_logits(anchors, candidates, torch.tensor([0, 1]), 0.1, anchor_ids=ids, candidate_ids=torch.tensor([5, 9, 5, 9]))
    expected = anchors @ candidates.T / 0.1
    expected[0, 2] = expected[1, 3] = float("-inf")
    torch.testing.assert_close(logits, expected)
