"""Does CoDIR distil better? Baselines and CoDIR in one framework, same budget, several seeds.

    python experiments/compare.py compare [--variants=ce,kd,kd_mse,kd_codir,kd_codir_b01] [--seeds=3] [--out=runs/compare]
    python experiments/compare.py sweep --beta=0.1,1 --tau=0.07,0.2 --k=16,100 [--seeds=2]

With no task given it runs the embedded setting: the pretrained MiniLM-L6 teacher finetuned (3 epochs, in
this process, once) on the same Rotten Tomatoes training reviews, and a 3-layer student initialised from its layers 2, 4, 6.
Any other run-config key is an override (`--task.max_seq_length=128`, `--teacher.path=...`, ...), applied
to every variant. Each run is one process, one rank (`ds_configs/cpu_zero0.json` unless overridden); the
student is scored by the best dev accuracy (the task's first metric) over its evaluations. Writes
`<out>/results.csv`, `<out>/results.md` (mean +- sample std over seeds) and a TensorBoard run per variant
and seed under `<out>/runs/`.
"""

from __future__ import annotations

import csv
import itertools
import shutil
import statistics
import time
from pathlib import Path

import fire

from codir_ds.config import load_config
from codir_ds.demo import minilm_path, write_rotten_tomatoes
from codir_ds.finetune.config import FinetuneConfig
from codir_ds.finetune.run import run_finetuning, teacher_training_config

VARIANTS = {  # name: (description, overrides)
    "ce": ("CE only", {"loss.alpha": 0.0, "loss.beta": 0.0}),
    "kd": ("CE + KD", {"loss.alpha": 0.5, "loss.beta": 0.0}),
    "kd_mse": ("CE + KD + MSE (PKD: normalised pooled states, beta 100)", {"loss.alpha": 0.5, "loss.intermediate": "mse", "loss.beta": 100.0}),
    "kd_mse_tokens": ("CE + KD + MSE on token states (beta 1)", {"loss.alpha": 0.5, "loss.intermediate": "mse_tokens", "loss.beta": 1.0}),
    "kd_cosine": ("CE + KD + cosine (DistilBERT, beta 1)", {"loss.alpha": 0.5, "loss.intermediate": "cosine", "loss.beta": 1.0}),
    "kd_codir": ("CE + KD + CoDIR (beta 1, tau 0.07, K 100 label-aware)", {"loss.alpha": 0.5, "loss.intermediate": "codir", "loss.beta": 1.0}),
    "kd_codir_b01": (
        "CE + KD + CoDIR (beta 0.1, tau 0.07, K 100 label-aware; beta from the sweep)",
        {"loss.alpha": 0.5, "loss.intermediate": "codir", "loss.beta": 0.1},
    ),
}
EMBEDDED = {  # the embedded setting; overridable key by key
    "task.name": "custom",
    "task.labels": ["rotten", "fresh"],
    "task.max_seq_length": 48,
    "student.init": "teacher_layers",
    "student.num_layers": 3,
    "codir.negatives": "bank",
    "codir.num_negatives": 100,
    "train.deepspeed_config": "ds_configs/cpu_zero0.json",
    "train.micro_batch_size": 32,
    "train.lr": 1e-4,
    "train.epochs": 2,
    "train.warmup_steps": 10,
    "teacher.zero3": False,
    "eval.every": 40,
    "eval.batch_size": 128,
    "logging.every": 10,
    "checkpoint.every": 0,
    "output.export": False,
}


def compare(
    variants: str = "ce,kd,kd_mse,kd_codir,kd_codir_b01",
    seeds: int = 3,
    out: str = "runs/compare",
    train_examples: int = 2000,
    dev_examples: int = 1000,
    **overrides,
) -> list[dict]:
    """Train each variant with seeds 1..`seeds` and tabulate the best dev score of each."""
    names = _values(variants)
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"compare: unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    base = {**EMBEDDED, **_embedded_task(Path(out), train_examples, dev_examples, overrides), **overrides}
    runs = [(name, VARIANTS[name][0], VARIANTS[name][1]) for name in names]
    return _run_all(runs, seeds, Path(out), base, title="variant")


def sweep(
    beta: str = "0.1,1",
    tau: str = "0.07,0.2",
    k: str = "16,100",
    seeds: int = 2,
    out: str = "runs/sweep",
    train_examples: int = 2000,
    dev_examples: int = 1000,
    **overrides,
) -> list[dict]:
    """CE + KD + CoDIR over the grid beta x tau x K (comma-separated values), same budget and seeds."""
    base = {**EMBEDDED, **_embedded_task(Path(out), train_examples, dev_examples, overrides), **overrides}
    runs = []
    for b, t, negatives in itertools.product(*(_values(v) for v in (beta, tau, k))):
        settings = {
            "loss.alpha": 0.5,
            "loss.intermediate": "codir",
            "loss.beta": float(b),
            "codir.temperature": float(t),
            "codir.num_negatives": int(negatives),
        }
        runs.append((f"beta{b}_tau{t}_k{negatives}", f"CE + KD + CoDIR, beta {b}, tau {t}, K {negatives}", settings))
    return _run_all(runs, seeds, Path(out), base, title="setting")


def _values(value) -> list[str]:
    """A comma-separated list as given on the command line (fire turns `0.1,1` into a tuple)."""
    return [str(v) for v in value] if isinstance(value, (list, tuple)) else str(value).split(",")


def _embedded_task(out: Path, train_examples: int, dev_examples: int, overrides: dict) -> dict:
    """Task files and teacher of the embedded setting, unless the overrides give them."""
    task = {}
    if "task.train_file" not in overrides:
        train, dev = write_rotten_tomatoes(out / "data", train_examples, dev_examples)
        task = {"task.train_file": str(train), "task.dev_files": [str(dev)]}
    if "teacher.path" not in overrides:
        task["teacher.path"] = str(_finetuned_teacher(out, {**EMBEDDED, **task, **overrides}))
    return task


TEACHER_TRAINING = {"train.epochs": 3, "train.lr": 1e-4}


def _finetuned_teacher(out: Path, settings: dict) -> Path:
    teacher = out / "teacher" / "teacher"
    if not (teacher / "eval_results.json").is_file():
        config = load_config(
            FinetuneConfig,
            None,
            {**settings, **TEACHER_TRAINING, "teacher.path": str(minilm_path()), "output.dir": str(out / "teacher"), "output.export": True},
            validate=False,
        )
        run_finetuning(teacher_training_config(config), export_name="teacher")
        shutil.rmtree(out / "teacher" / "checkpoints", ignore_errors=True)
    return teacher


def _run_all(runs: list[tuple[str, str, dict]], seeds: int, out: Path, base: dict, title: str) -> list[dict]:
    rows = []
    for seed in range(1, seeds + 1):  # seed-major: a stopped comparison still has every variant for the first seeds
        for name, description, settings in runs:
            folder = out / "runs" / f"{name}_seed{seed}"
            started = time.perf_counter()
            run = run_finetuning(
                load_config(FinetuneConfig, None, {**base, **settings, "train.seed": seed, "output.dir": str(folder), "checkpoint.resume": ""})
            )
            shutil.rmtree(folder / "checkpoints", ignore_errors=True)
            rows.append(
                {
                    "name": name,
                    "description": description,
                    "seed": seed,
                    "metric": run.best["metric"],
                    "score": run.best["score"],
                    "best_step": run.best["step"],
                    "steps": run.cfg.train.max_steps,
                    "seconds": round(time.perf_counter() - started, 1),
                }
            )
            print(f"compare: {name} seed {seed}: {run.best['metric']} {run.best['score']:.4f}", flush=True)
            _write_tables(rows, runs, out, title)
    return rows


def _write_tables(rows: list[dict], runs: list[tuple[str, str, dict]], out: Path, title: str) -> None:
    with (out / "results.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    lines = [
        f"| {title} | dev {rows[0]['metric'].split('/')[-1]} (mean ± std) | seeds | per seed | minutes per run |",
        "| --- | ---: | ---: | --- | ---: |",
    ]
    for name, description, _ in runs:
        scores = [r["score"] * 100 for r in rows if r["name"] == name]
        if not scores:
            continue
        spread = statistics.stdev(scores) if len(scores) > 1 else float("nan")
        minutes = statistics.mean(r["seconds"] for r in rows if r["name"] == name) / 60
        lines.append(
            f"| {description} | {statistics.mean(scores):.2f} ± {spread:.2f} | {len(scores)} | "
            f"{', '.join(f'{s:.1f}' for s in scores)} | {minutes:.1f} |"
        )
    (out / "results.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    fire.Fire({"compare": compare, "sweep": sweep})
