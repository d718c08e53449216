"""Stage 2 in one process: cached teacher outputs equal a live teacher, regression, teacher finetuning,
export of the best student, and one-line errors for bad task input."""

import json
import math
import subprocess
import sys

import pytest
import torch
from helpers import REPO, child_env, plain_accuracy, save_task_teacher, save_tiny_model, tensorboard_scalars, write_task, write_task_config
from huggingface_hub import ModelCard
from test_pretrain_cli import one_line_error
from transformers import AutoConfig

from codir_ds.finetune.config import FinetuneConfig
from codir_ds.finetune.run import run_finetuning, teacher_training_config
from codir_ds.method.losses import CONTRASTIVE_STATS
from codir_ds.method.memory_bank import MemoryBank
from codir_ds.method.objective import CodirObjective
from codir_ds.runs.state_files import save_state
from codir_ds.runtime.config import load_config
from codir_ds.runtime.errors import CodirError


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    folder = tmp_path_factory.mktemp("task")
    return write_task(folder / "train.csv", 96), write_task(folder / "dev.csv", 40, seed=1)


@pytest.fixture(scope="module")
def task_teacher(tmp_path_factory):
    return save_task_teacher(tmp_path_factory.mktemp("task_teacher"))


def config(tmp_path, teacher, task, **overrides):
    return load_config(FinetuneConfig, str(write_task_config(tmp_path, teacher, *task)), overrides)


def test_cached_teacher_outputs_train_exactly_like_a_live_teacher(tmp_path, task_teacher, task):
    cached = run_finetuning(config(tmp_path / "cached", task_teacher, task, **{"teacher.live": False, "train.lr": 0.003, "train.epochs": 3}))
    measured = {"teacher.live": True, "train.lr": 0.003, "train.epochs": 3, "logging.gradient_ratio": True}  # and must change nothing
    live = run_finetuning(config(tmp_path / "live", task_teacher, task, **measured))
    assert cached.teacher is None
    assert live.teacher is not None
    assert len(cached.history) == len(live.history) == 36
    for a, b in zip(cached.history, live.history):
        assert a.keys() == b.keys() - {"gradient_ratio"} == {"total", "ce", "kd", "codir", *CONTRASTIVE_STATS}
        assert a == pytest.approx({k: v for k, v in b.items() if k != "gradient_ratio"}, rel=1e-4, abs=1e-5)
        assert 0 < b["gradient_ratio"] < math.inf
    codir = [step["codir"] for step in cached.history]
    assert sum(codir[-6:]) < 0.6 * sum(codir[:6])  # the student learns to pick its teacher feature
    assert cached.evals[-1]["metrics"] == live.evals[-1]["metrics"]


def record_queue_logits(monkeypatch) -> list[dict]:
    """Every queue step's contrastive logits, each anchor's positive and example id, and the candidates' example
    ids (this batch's, then the queue's), as the run computed them."""
    steps = []
    compute = CodirObjective._queue_logits

    def recording(self, anchors, teacher_features, labels, ids):
        logits, positive = compute(self, anchors, teacher_features, labels, ids)
        candidates = torch.cat([ids, self.queue.stored()[2]])  # one rank: the gathered batch is this batch
        steps.append({"logits": logits.detach().clone(), "positive": positive, "anchors": ids.clone(), "candidates": candidates.clone()})
        return logits, positive

    monkeypatch.setattr(CodirObjective, "_queue_logits", recording)
    return steps


def assert_queue_masks(steps: list[dict], labels: torch.Tensor | None) -> dict[str, int]:
    """Each logit is -inf exactly where its candidate is another copy of the anchor's example or (with the examples'
    `labels`, by id) shares its label, its positive excepted; returns how many were masked for each reason."""
    counts = {"id": 0, "label": 0}
    for step in steps:
        anchors, candidates, positive = step["anchors"], step["candidates"], step["positive"]
        assert (candidates >= 0).all()  # every queued row knows its example
        same_id = anchors[:, None] == candidates[None, :]
        same_label = labels[anchors][:, None] == labels[candidates][None, :] if labels is not None else torch.zeros_like(same_id)
        masked = same_id | same_label
        masked[torch.arange(len(anchors)), positive] = False
        assert torch.equal(step["logits"] == float("-inf"), masked)
        assert step["logits"][~masked].isfinite().all()
        counts["id"] += int((masked & same_id).sum())
        counts["label"] += int((masked & same_label & ~same_id).sum())
    return counts


def test_regression_with_queue_negatives(tmp_path, tiny_teacher, monkeypatch):
    train, dev = write_task(tmp_path / "train.csv", 96, regression=True), write_task(tmp_path / "dev.csv", 30, seed=2, regression=True)
    teacher = save_task_teacher(tmp_path / "teacher", num_labels=1)
    cfg = config(tmp_path, teacher, (train, dev), **{"task.regression": True, "codir.negatives": "queue", "train.epochs": 2})
    steps = record_queue_logits(monkeypatch)
    run = run_finetuning(cfg)
    assert len(steps) == 24
    assert assert_queue_masks(steps, labels=None)["id"] > 0  # the second epoch meets its examples' first-epoch copies in the queue
    assert run.task.metrics == ("pearson", "spearman")
    assert run.objective.queue.filled == 32
    assert run.bank is None
    assert run.history[-1]["ce"] < run.history[0]["ce"]  # the MSE on the score falls
    results = json.loads((tmp_path / "out/student/eval_results.json").read_text())
    assert set(results["best"]["metrics"]["dev"]) == {"pearson", "spearman"}
    card = ModelCard.load(tmp_path / "out/student/README.md")
    assert {(r.dataset_split, r.metric_type): r.metric_value for r in card.data.eval_results} == {
        ("dev", metric): value for metric, value in results["best"]["metrics"]["dev"].items()
    }
    assert (card.data.base_model, card.data.datasets) == (str(teacher), ["train.csv"])
    assert f"best dev/pearson, step {results['best']['step']}" in card.text
    exported = AutoConfig.from_pretrained(tmp_path / "out/student")
    assert exported.num_labels == 1
    assert exported.problem_type == "regression"
    scalars = tensorboard_scalars(tmp_path / "out/tensorboard")
    assert {"loss/total", "loss/ce", "loss/kd", "loss/codir", "codir/queue_fill", "eval/dev/pearson", "lr"} <= set(scalars)


def test_queue_negatives_of_the_anchors_label_are_masked(tmp_path, task_teacher, task, monkeypatch):
    steps = record_queue_logits(monkeypatch)
    run = run_finetuning(config(tmp_path, task_teacher, task, **{"codir.negatives": "queue", "train.max_steps": 6}))
    labels = torch.full((len(run.data.train),), -1)
    labels[run.data.train["idx"]] = torch.tensor(run.data.train["label"])
    assert len(steps) == 6
    assert assert_queue_masks(steps, labels)["label"] > 0


def record_bank_draws(monkeypatch) -> list[torch.Tensor]:
    """The bank rows drawn as negatives, per step."""
    draws = []
    sample = MemoryBank.sample_negatives

    def recording(self, *args):
        draws.append(sample(self, *args).clone())
        return draws[-1]

    monkeypatch.setattr(MemoryBank, "sample_negatives", recording)
    return draws


@pytest.mark.parametrize("negatives", ["bank", "queue"])
def test_stage2_resumed_mid_epoch_equals_the_uninterrupted_run(tmp_path, task_teacher, task, negatives, monkeypatch):
    steps = record_queue_logits(monkeypatch) if negatives == "queue" else record_bank_draws(monkeypatch)

    def drawn() -> list[list]:  # the negatives each step contrasted against: bank rows, or the queue's examples
        taken = [step["candidates"] if negatives == "queue" else step for step in steps]
        steps.clear()
        return [rows.tolist() for rows in taken]

    def run(folder, stop_after=None):
        overrides = {"codir.negatives": negatives, "train.epochs": 2, "eval.every": 6, "train.lr": 0.003}
        return run_finetuning(config(tmp_path / folder, task_teacher, task, **overrides), stop_after=stop_after)

    whole = run("whole")
    whole_drawn = drawn()
    stopped = run("split", stop_after=7)  # 12 steps per epoch: in the middle of the first
    assert len(stopped.history) == 7
    assert (tmp_path / "split/out/checkpoints/latest").read_text() == "step_7"
    resumed = run("split")
    assert drawn() == whole_drawn
    assert len(whole_drawn) == 24
    assert resumed.history == whole.history[7:]
    assert resumed.evals == whole.evals
    assert [e["step"] for e in whole.evals] == [6, 12, 18, 24]
    assert resumed.best == whole.best


def test_teacher_finetuning_then_distillation_exports_the_best_student(tmp_path, task):
    base = save_tiny_model(tmp_path / "base", layers=4, mlm_head=False)  # like MiniLM: a pretrained body only
    teacher_run = run_finetuning(
        teacher_training_config(config(tmp_path / "t", base, task, **{"train.epochs": 10, "train.lr": 0.003})), export_name="teacher"
    )
    teacher_dir = tmp_path / "t/out/teacher"
    assert teacher_run.teacher is None
    assert "kd" not in teacher_run.history[0]
    assert "codir" not in teacher_run.history[0]
    assert teacher_run.best["score"] >= 0.8  # the task is learnable: the teacher gets most of the dev set right

    stage1 = save_tiny_model(tmp_path / "stage1", layers=2, mlm_head=True, seed=3)  # a stage-1 export stands in
    cfg = config(
        tmp_path / "s",
        teacher_dir,
        task,
        **{"student.init": "checkpoint", "student.checkpoint": str(stage1), "train.epochs": 4, "train.lr": 0.003, "eval.every": 6},
    )
    run = run_finetuning(cfg)
    assert [e["step"] for e in run.evals] == [6, 12, 18, 24, 30, 36, 42, 48]
    best = max(run.evals, key=lambda e: e["metrics"]["dev"]["accuracy"])
    assert run.best["score"] == best["metrics"]["dev"]["accuracy"]
    assert run.best["step"] == best["step"]

    assert plain_accuracy(tmp_path / "s/out/student", task[1]) == pytest.approx(run.best["score"])  # the export is the best student


def finetune(config_path, *args):
    command = [sys.executable, str(REPO / "launch/finetune.py"), *args, f"--config={config_path}"]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=REPO, env=child_env())


def finetune_error(path, **overrides) -> str:
    """The one-line error a run with `overrides` stops with (in-process; the CLI prints it as is)."""
    with pytest.raises(CodirError) as caught:
        run_finetuning(load_config(FinetuneConfig, str(path), overrides))
    return str(caught.value)


def test_errors_for_a_wrong_teacher_or_task(tmp_path, task, task_teacher, tiny_teacher):
    path = write_task_config(tmp_path, task_teacher, *task)
    assert finetune_error(path, **{"teacher.path": str(tiny_teacher)}) == (
        f"teacher.path: {tiny_teacher} has no classification head: finetune it on the task first (deepspeed launch/finetune.py teacher --config ...)"
    )
    assert finetune_error(path, **{"task.labels": ["a", "b", "c"]}) == (
        f"task: {task[0]} has labels ['neg', 'pos'] that are not among the task's labels ['a', 'b', 'c']"
    )
    three_way = save_task_teacher(tmp_path / "three", num_labels=3)
    assert finetune_error(path, **{"teacher.path": str(three_way)}) == "teacher.path: the teacher predicts 3 labels, task custom has 2"
    assert finetune_error(path, **{"task.text_columns": ["review"]}) == (
        f"task.text_columns: no column 'review' in {task[0]}; its columns are ['text', 'label']"
    )
    assert one_line_error(finetune(path, "student")) == "unknown finetune command 'student'; use 'distill' (the default) or 'teacher'"


def test_stage2_refuses_to_resume_on_another_world_size_before_any_work(tmp_path, task, task_teacher):
    path = write_task_config(tmp_path, task_teacher, *task)
    checkpoint = tmp_path / "out/checkpoints/step_2"
    checkpoint.mkdir(parents=True)
    for r in range(2):  # as two ranks leave it
        save_state({"step": 2}, checkpoint / f"rank_{r}")
    (checkpoint.parent / "latest").write_text("step_2")
    assert one_line_error(finetune(path)) == (
        f"checkpoint {checkpoint} was written by 2 ranks, this run has 1: resume with 2 ranks, or export it and start "
        "a new run from the export (student.init=checkpoint)"
    )


def test_cli_teacher_command_needs_no_student_section(tmp_path, task, tiny_teacher):
    raw = json.loads(write_task_config(tmp_path, tiny_teacher, *task).read_text())
    del raw["student"]  # its default (start from a stage-1 checkpoint) does not apply to the teacher
    (tmp_path / "teacher.json").write_text(json.dumps(raw))
    result = finetune(tmp_path / "teacher.json", "teacher", "--train.max_steps=2")
    assert result.returncode == 0, result.stderr[-3000:]
    exported = AutoConfig.from_pretrained(tmp_path / "out/teacher")
    assert exported.num_hidden_layers == 4
    assert exported.id2label == {0: "neg", 1: "pos"}


@pytest.mark.parametrize("intermediate, teacher_kept", [("mse", False), ("mse_tokens", True), ("cosine", True)])
def test_baseline_intermediate_losses_train_through_the_same_loop(tmp_path, task_teacher, task, intermediate, teacher_kept):
    run = run_finetuning(
        config(tmp_path, task_teacher, task, **{"loss.intermediate": intermediate, "loss.beta": 10.0, "train.epochs": 2, "train.lr": 0.003})
    )
    assert (run.teacher is not None) == teacher_kept
    assert run.student.module.codir is None
    values = [step[intermediate] for step in run.history]
    assert "codir" not in run.history[0]
    assert sum(values[-4:]) < sum(values[:4])


def test_crd_nce_trains_against_its_momentum_memory(tmp_path, task_teacher, task):
    overrides = {"codir.objective": "crd_nce", "loss.beta": 1.0, "train.epochs": 2, "train.lr": 0.003}
    run = run_finetuning(config(tmp_path, task_teacher, task, **overrides))
    memory = run.student.module.codir.memory
    assert memory.normalisers.min() > 0  # Z set at the first step
    assert memory.teacher_rows.norm(dim=1) == pytest.approx(torch.ones(96))  # every example's row moved (unit norm since)
    codir = [step["codir"] for step in run.history]
    assert all(math.isfinite(value) for value in codir)
    assert sum(codir[-6:]) < sum(codir[:6])
    with pytest.raises(CodirError, match="^codir.objective: crd_nce scores rows of a memory over the training set; it needs codir.negatives=bank$"):
        config(tmp_path / "queue", task_teacher, task, **{"codir.objective": "crd_nce", "codir.negatives": "queue"})
