"""Stage 2 on 2 real CPU ranks (deepspeed launcher): ZeRO-3 teacher, memory bank or queue, shared evaluation."""

import pytest
from helpers import REPO, launch_worker, plain_accuracy, save_task_teacher, write_task, write_task_config

pytestmark = pytest.mark.multirank
WORKER = REPO / "tests/workers/finetune_worker.py"


def launch(config, out, *extra):
    return launch_worker(WORKER, config, out, *extra)


@pytest.mark.parametrize("negatives", ["bank", "queue"])
def test_two_rank_finetune_distillation(tmp_path, negatives):
    teacher = save_task_teacher(tmp_path / "teacher")
    train, dev = write_task(tmp_path / "train.csv", 100), write_task(tmp_path / "dev.csv", 31, seed=1)
    config = write_task_config(
        tmp_path, teacher, train, dev, codir={"negatives": negatives}, train={"epochs": 2, "lr": 0.003}, eval={"every": 3, "batch_size": 4}
    )
    first, second = launch(config, tmp_path)
    assert first["steps"] == 12  # 100 // (8 x 2 ranks) = 6 steps per epoch
    assert len(first["losses"]) == len(second["losses"]) == 12
    assert first["losses"] == second["losses"]  # logged values are averaged over the ranks
    assert first["evals"] == second["evals"]
    assert [e["step"] for e in first["evals"]] == [3, 6, 9, 12]
    assert first["best"] == second["best"]
    assert first["best"]["score"] == max(e["metrics"]["dev"]["accuracy"] for e in first["evals"])
    assert plain_accuracy(tmp_path / "out/student", dev) == pytest.approx(first["best"]["score"])  # the export, scored on all 31
    if negatives == "bank":  # both ranks hold the whole bank, exactly the teacher's outputs
        assert first["bank_feature_error"] < 1e-5
        assert first["bank_logit_error"] < 1e-5
        assert first["bank_sum"] == second["bank_sum"]
    else:  # the queue holds the same all-gathered rows, with their labels, on both ranks
        assert first["queue_sum"] == second["queue_sum"]
        assert first["queue_labels"] == second["queue_labels"]
        assert set(first["queue_labels"]) == {0, 1}
