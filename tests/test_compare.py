"""experiments/compare.py on tiny models: every variant and seed trains, and the table is their mean and spread."""

import csv
import importlib.util
import statistics

from helpers import REPO, save_task_teacher, write_task

spec = importlib.util.spec_from_file_location("compare", REPO / "experiments/compare.py")
compare = importlib.util.module_from_spec(spec)
spec.loader.exec_module(compare)


def tiny_setting(tmp_path):
    return {
        "task.train_file": str(write_task(tmp_path / "train.csv", 64)),
        "task.dev_files": [str(write_task(tmp_path / "dev.csv", 20, seed=1))],
        "task.labels": ["neg", "pos"],
        "teacher.path": str(save_task_teacher(tmp_path / "teacher")),
        "student.num_layers": 2,
        "task.max_seq_length": 24,
        "train.micro_batch_size": 8,
        "train.epochs": 1,
        "eval.every": 4,
        "codir.num_negatives": 8,
        "codir.projection_dim": 16,
    }


def test_compare_trains_every_variant_and_seed_and_tabulates_them(tmp_path):
    rows = compare.compare(variants="ce,kd_mse,kd_codir", seeds=2, out=str(tmp_path / "out"), **tiny_setting(tmp_path))
    assert [(r["name"], r["seed"]) for r in rows] == [(n, s) for s in (1, 2) for n in ("ce", "kd_mse", "kd_codir")]
    with open(tmp_path / "out/results.csv") as handle:
        saved = list(csv.DictReader(handle))
    assert [float(r["score"]) for r in saved] == [r["score"] for r in rows]
    table = (tmp_path / "out/results.md").read_text().splitlines()
    assert len(table) == 2 + 3
    scores = [100 * r["score"] for r in rows if r["name"] == "kd_codir"]
    assert f"| {compare.VARIANTS['kd_codir'][0]} | {statistics.mean(scores):.2f} ± {statistics.stdev(scores):.2f} | 2 |" in table[4]
    assert (tmp_path / "out/runs/kd_mse_seed2/tensorboard").is_dir()
    assert not (tmp_path / "out/runs/kd_mse_seed2/checkpoints").exists()  # removed after each run


def test_sweep_runs_the_grid(tmp_path):
    rows = compare.sweep(beta=(0.5, 2), tau="0.1", k=4, seeds=1, out=str(tmp_path / "out"), **tiny_setting(tmp_path))
    assert [r["name"] for r in rows] == ["beta0.5_tau0.1_k4", "beta2_tau0.1_k4"]
    assert "CE + KD + CoDIR, beta 2, tau 0.1, K 4" in (tmp_path / "out/results.md").read_text()
