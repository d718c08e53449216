"""CoDIR-Pre -> Fine: does CoDIR in pre-training distillation help once the student is finetuned?

    python experiments/pre_fine.py [--data=vitaminc] [--seeds=8] [--steps=2000] [--out=runs/pre_fine] [--jobs=1]

Two stage-1 students with the same teacher, steps, data and seed: masked-LM (+ KD where the teacher has an MLM head)
+ CoDIR, and the same with `loss.codir: 0`. Their corpus is the training split's texts of the task (for VitaminC,
the evidence passages of its training titles), so neither sees dev or test. Each is then finetuned with CE + KD by
`compare.py` on the same seeds and the same finetuned task teacher, and `<out>/pre_fine.md` gives the paired test
difference with a 95 % interval. Any other key overrides the finetuning runs; `--pretrain_teacher` the stage-1
teacher (default MiniLM-L6), `--corpus` the stage-1 corpus (a .txt/.jsonl file).
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import fire

sys.path.insert(0, str(Path(__file__).parent))
import compare  # noqa: E402  (experiments/compare.py, beside this file)

from codir_ds.demo import minilm_path  # noqa: E402
from codir_ds.pretrain.config import PretrainConfig  # noqa: E402
from codir_ds.pretrain.run import run_pretraining  # noqa: E402
from codir_ds.runtime.config import load_config  # noqa: E402

ARMS = {"codir": 1.0, "mlm": 0.0}  # stage-1 loss.codir of each student
PRETRAINING = {"student.num_layers": 3, "data.max_seq_length": 128, "train.micro_batch_size": 32, "train.lr": 3e-4, "train.warmup_steps": 100}


def pre_fine(
    data: str = "vitaminc",
    seeds: int = 8,
    steps: int = 2000,
    out: str = "runs/pre_fine",
    corpus: str = "",
    pretrain_teacher: str = "",
    jobs: int = 1,
    **overrides,
) -> dict[str, list[dict]]:
    """Pre-train both students, finetune each over `seeds`, and write the paired comparison; returns the rows by arm."""
    out_dir = Path(out)
    text = Path(corpus) if corpus else training_texts(out_dir, data)
    teacher = pretrain_teacher or str(minilm_path())
    students = {arm: pretrain(out_dir / f"pre_{arm}", text, teacher, steps, weight) for arm, weight in ARMS.items()}
    rows, task_teacher = {}, overrides.pop("teacher.path", "")
    for arm, student in students.items():
        settings = {**overrides, "student.init": "checkpoint", "student.checkpoint": str(student)}
        if task_teacher:
            settings["teacher.path"] = task_teacher
        rows[arm] = compare.compare(variants="kd", beta="", seeds=seeds, out=str(out_dir / f"fine_{arm}"), data=data, jobs=jobs, **settings)
        task_teacher = task_teacher or str(out_dir / f"fine_{arm}" / "teacher" / "teacher")  # finetuned once, for both arms
    write_pre_fine_report(rows, out_dir, steps)
    return rows


def training_texts(out: Path, data: str) -> Path:
    """`<out>/corpus.jsonl`: the distinct texts of the embedded task's training split (the split compare.py uses)."""
    write, _, sizes = compare.EMBEDDED_DATA[data]
    with write(out / "data", *sizes)["train"].open() as handle:
        texts = dict.fromkeys(row["text"] for row in csv.DictReader(handle))
    path = out / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))
    return path


def pretrain(out: Path, corpus: Path, teacher: str, steps: int, codir_weight: float) -> Path:
    """A stage-1 student of `steps` steps on `corpus` with CoDIR at `codir_weight` (0: none); returns its export."""
    if not (out / "student" / "config.json").is_file():
        settings = {**PRETRAINING, "teacher.path": teacher, "data.files": [str(corpus)], "train.max_steps": steps, "loss.codir": codir_weight}
        run_pretraining(load_config(PretrainConfig, None, {**settings, "output.dir": str(out), "checkpoint.resume": ""}))
    return out / "student"


def write_pre_fine_report(rows: dict[str, list[dict]], out: Path, steps: int) -> None:
    """`<out>/pre_fine.md`: each arm's test score over seeds and the paired difference, CoDIR-pre-trained minus not."""
    tests = {arm: {r["seed"]: 100 * r["test"] for r in arm_rows} for arm, arm_rows in rows.items()}
    seeds = sorted(tests["codir"].keys() & tests["mlm"].keys())
    mean, low, high = compare.paired_interval([tests["codir"][s] for s in seeds], [tests["mlm"][s] for s in seeds])
    metric = rows["codir"][0]["metric"]
    lines = [f"| stage-1 student ({steps} steps), then CE + KD | test {metric} (mean ± std) | seeds |", "| --- | ---: | ---: |"]
    for arm, label in (("codir", "MLM (+ KD) + CoDIR"), ("mlm", "MLM (+ KD), no CoDIR")):
        average, spread = compare._mean_std(list(tests[arm].values()))
        lines.append(f"| {label} | {average:.2f} ± {spread:.2f} | {len(tests[arm])} |")
    difference = f"{mean:+.2f} [{low:+.2f}, {high:+.2f}] (95 % CI)"
    lines += ["", f"CoDIR-Pre -> Fine minus no CoDIR in pre-training, paired over {len(seeds)} seeds: {difference}."]
    (out / "pre_fine.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    fire.Fire(pre_fine)
