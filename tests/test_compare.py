"""experiments/compare.py: splits by film, selection on dev only, the paired interval, the report and the figure
(no training, except one end-to-end run of tiny models)."""

import csv
import importlib.util
import json
import math
import statistics

import pytest
from helpers import REPO, read_json, save_task_teacher, write_corpus, write_task
from PIL import Image
from scipy import stats

from codir_ds.demo import split_by_group, write_conventions_by_speaker, write_rotten_tomatoes_by_film
from codir_ds.vitaminc import vitaminc_pairs, write_vitaminc_by_title

spec = importlib.util.spec_from_file_location("compare", REPO / "experiments/compare.py")
compare = importlib.util.module_from_spec(spec)
spec.loader.exec_module(compare)
spec = importlib.util.spec_from_file_location("pre_fine", REPO / "experiments/pre_fine.py")
pre_fine = importlib.util.module_from_spec(spec)
spec.loader.exec_module(pre_fine)


def read_split(path):
    with open(path) as handle:
        return list(csv.DictReader(handle))


@pytest.mark.parametrize(
    ("write", "group", "labels", "sizes"),
    [
        (write_rotten_tomatoes_by_film, "film", {"fresh", "rotten"}, (2000, 1000, 3000)),
        (write_conventions_by_speaker, "speaker", {"democrat", "republican"}, (1500, 500, 800)),
    ],
)
def test_embedded_splits_share_no_group_and_no_text(tmp_path, write, group, labels, sizes):
    splits = {name: read_split(path) for name, path in write(tmp_path, *sizes).items()}
    assert {name: len(rows) for name, rows in splits.items()} == dict(zip(("train", "dev", "test"), sizes))
    groups = {name: {r[group] for r in rows} for name, rows in splits.items()}
    texts = {name: {r["text"] for r in rows} for name, rows in splits.items()}
    for a, b in (("train", "dev"), ("train", "test"), ("dev", "test")):
        assert not groups[a] & groups[b], (a, b)
        assert not texts[a] & texts[b], (a, b)
    assert {r["label"] for rows in splits.values() for r in rows} == labels


def test_vitaminc_pairs_split_by_title_with_no_pair_in_two_splits(tmp_path):
    """A BIG-bench-format task.json of VitaminC pairs: a claim under two evidence texts is two pairs; titles stay apart."""
    examples = [
        {
            "input": f"Title {t}: evidence {t}.{e} with: a colon\nClaim: claim {t}.{e % 2}",
            "target_scores": {"True": e % 3 == 0, "False": e % 3 == 1, "Neither": e % 3 == 2},
        }
        for t in range(12)
        for e in range(4)
    ]
    task = tmp_path / "task.json"
    task.write_text(json.dumps({"examples": examples}))
    pairs = vitaminc_pairs(task)
    assert pairs[1] == {"text": "evidence 0.1 with: a colon", "text_pair": "claim 0.1", "label": "False", "title": "Title 0"}
    splits = {name: read_split(path) for name, path in write_vitaminc_by_title(tmp_path / "out", 16, 8, 8, task=task).items()}
    assert {name: len(rows) for name, rows in splits.items()} == {"test": 8, "dev": 8, "train": 16}
    assert list(splits["train"][0]) == ["text", "text_pair", "label", "title"]
    titles = {name: {r["title"] for r in rows} for name, rows in splits.items()}
    pairs = {name: {(r["text"], r["text_pair"]) for r in rows} for name, rows in splits.items()}
    for a, b in (("train", "dev"), ("train", "test"), ("dev", "test")):
        assert not titles[a] & titles[b], (a, b)
        assert not pairs[a] & pairs[b], (a, b)


def test_a_text_under_two_films_is_kept_once():
    reviews = [{"text": f"review {i}", "label": "fresh", "film": f"film {i // 2}"} for i in range(8)]
    reviews.append({"text": "review 0", "label": "rotten", "film": "film 3"})  # a repeat under another film
    splits = split_by_group(reviews, {"test": 2, "dev": 2, "train": 2}, "film")
    texts = [r["text"] for rows in splits.values() for r in rows]
    assert len(texts) == len(set(texts))
    assert len({r["film"] for r in splits["test"]} & {r["film"] for r in splits["train"]}) == 0


def history(dev, test):
    return [{"step": 10 * (i + 1), "metrics": {"dev": {"accuracy": d}, "test": {"accuracy": t}}} for i, (d, t) in enumerate(zip(dev, test))]


def test_selection_reads_dev_only():
    dev = [0.70, 0.74, 0.74, 0.72]
    chosen = compare.selected_scores(history(dev, [0.9, 0.1, 0.2, 0.95]), "accuracy", "dev", "test")
    assert chosen == (20, 0.74, 0.1)  # the best dev step (the earliest of a tie), whatever test says
    poisoned = compare.selected_scores(history(dev, [math.nan] * 4), "accuracy", "dev", "test")
    assert poisoned[0] == chosen[0]
    assert compare.select_checkpoint([(10, 0.5), (20, math.nan), (30, 0.6)]) == 30


def rows_for(name, tests, devs=None, beta="", tau=""):
    devs = devs or tests
    return [
        {"name": name, "description": name, "seed": s + 1, "beta": beta, "tau": tau, "k": 100 if beta != "" else "", "metric": "accuracy"}
        | {"dev": d, "test": t, "step": 40, "steps": 125, "seconds": 60.0}
        for s, (d, t) in enumerate(zip(devs, tests))
    ]


def test_paired_interval_matches_scipy_and_a_hand_computation():
    a, b = [80.1, 79.4, 81.0, 80.6, 79.9], [79.0, 79.5, 80.2, 79.1, 79.6]
    mean, low, high = compare.paired_interval(a, b)
    differences = [x - y for x, y in zip(a, b)]  # 1.1, -0.1, 0.8, 1.5, 0.3: mean 0.72, sd 0.6261
    assert mean == pytest.approx(0.72)
    half = 2.7764451051977987 * statistics.stdev(differences) / math.sqrt(5)  # t(0.975, 4) from a table
    assert (low, high) == pytest.approx((0.72 - half, 0.72 + half), abs=1e-9)
    scipy_low, scipy_high = stats.t.interval(0.95, 4, loc=0.72, scale=stats.sem(differences))
    assert (low, high) == pytest.approx((scipy_low, scipy_high), abs=1e-9)
    for df in (1, 2, 3, 4, 7, 30):
        assert compare.t_critical(0.95, df) == pytest.approx(stats.t.ppf(0.975, df), abs=1e-9)


def test_paired_tests_and_holm_match_scipy_and_a_hand_computation():
    a, b = [80.1, 79.4, 81.0, 80.6, 79.9, 80.2, 80.0, 79.8], [79.9, 79.5, 80.7, 80.3, 80.0, 80.1, 79.6, 79.9]
    two_sided, tost = compare.paired_tests(a, b, margin=0.5)
    assert two_sided == pytest.approx(stats.ttest_rel(a, b).pvalue, abs=1e-9)
    lower = stats.ttest_rel(a, [y - 0.5 for y in b], alternative="greater").pvalue  # H0: a - b <= -0.5
    upper = stats.ttest_rel(a, [y + 0.5 for y in b], alternative="less").pvalue  # H0: a - b >= +0.5
    assert tost == pytest.approx(max(lower, upper), abs=1e-9)
    assert tost < 0.05  # differences of 0.1 +- 0.2: equivalent within 0.5
    assert compare.paired_tests(a, [y - 2 for y in b], margin=0.5)[1] > 0.5  # a 2-point gain is no equivalence
    # Holm: sorted 0.01, 0.02, 0.04 times 3, 2, 1 -> 0.03, 0.04, 0.04 (kept monotone), in the input order
    assert compare.holm([0.04, 0.01, math.nan, 0.02]) == pytest.approx([0.04, 0.03, math.nan, 0.04], nan_ok=True)


def test_term_activity_reads_the_logged_ratios_and_the_first_saturated_step():
    history = [{"top1_accuracy": 0.5, "gradient_ratio": 0.2}, {"top1_accuracy": 0.995, "gradient_ratio": 0.1}, {"top1_accuracy": 1.0}]
    assert compare.term_activity(history, every=10, total=25) == {"gradient_ratio": pytest.approx(0.15), "saturated_at": 20}
    assert compare.term_activity([{"total": 1.0}], every=10, total=10) == {"gradient_ratio": "", "saturated_at": ""}


def test_report_and_figure_come_from_the_rows_and_again_from_the_csv(tmp_path):
    rows = rows_for("kd", [0.80, 0.79, 0.81]) + rows_for("kd_mse", [0.805, 0.80, 0.80]) + rows_for("ce", [0.78, 0.78, 0.79])
    for beta, shift in ((0.01, 0.002), (0.1, -0.004), (1.0, -0.02)):
        for tau in (0.07, 0.2):
            name = f"codir_b{beta:g}_t{tau:g}_k100"
            rows += rows_for(name, [0.80 + shift, 0.79 + shift, 0.81 + shift], [0.7, 0.7, 0.7 + (beta == 0.1) * 0.01], beta, tau)
    compare.write_report(rows, tmp_path)
    table = (tmp_path / "results.md").read_text()
    assert "| kd | 80.00 ± 1.00 | 80.00 ± 1.00 | (reference) |  |  | 3 |" in table
    mean, low, high = compare.paired_interval([80.5, 80.0, 80.0], [80.0, 79.0, 81.0])
    by_name = {}
    for row in rows:
        by_name.setdefault(row["name"], []).append(100 * row["test"])
    arms = [name for name in by_name if name != "kd"]
    tests = {name: compare.paired_tests(by_name[name], by_name["kd"]) for name in arms}
    holm = dict(zip(arms, compare.holm([tests[name][0] for name in arms])))  # Holm across the 7 arms paired with CE + KD
    row = f"| kd_mse | 80.17 ± 0.29 | 80.17 ± 0.29 | {mean:+.2f} [{low:+.2f}, {high:+.2f}] | {holm['kd_mse']:.3f} | {tests['kd_mse'][1]:.3f} | 3 |"
    assert row in table
    mean, low, high = compare.paired_interval([80.0, 79.0, 81.0], [78.0, 78.0, 79.0])  # KD - CE: +1.67 [+0.23, +3.10]
    assert f"Positive control, CE + KD − CE only on test: {mean:+.2f} [{low:+.2f}, {high:+.2f}]; passes" in table
    compare.write_report([r for r in rows if r["name"] != "ce"] + rows_for("ce", [0.80, 0.78, 0.81]), tmp_path)
    assert "fails: this setting cannot test CoDIR" in (tmp_path / "results.md").read_text()  # KD - CE: +0.33 [-1.10, +1.77]
    compare.write_report(rows, tmp_path)
    assert "(chosen on dev only): **codir_b0.1_t0.07_k100**" in table  # best dev; its test is worse than beta 0.01's
    with Image.open(tmp_path / compare.FIGURE) as figure:
        assert figure.format == "PNG"
        assert figure.size == (900, 540)
    (tmp_path / "results.md").unlink()
    (tmp_path / compare.FIGURE).unlink()
    compare.report(str(tmp_path))
    assert (tmp_path / "results.md").read_text() == table
    assert (tmp_path / compare.FIGURE).is_file()


def test_the_baselines_and_the_first_tau_start_first():
    runs = [("kd", "", {})] + compare.codir_grid("0.1,1", "0.07,0.2", "100")
    order = [(name, seed) for name, _, _, seed in compare.run_order(runs, 2)]
    first = ["kd", "codir_b0.1_t0.07_k100", "codir_b1_t0.07_k100"]
    assert order[:6] == [(n, 1) for n in first] + [(n, 2) for n in first]
    assert order[6:] == [(f"codir_b{b}_t0.2_k100", s) for s in (1, 2) for b in ("0.1", "1")]


def tiny_task(folder, train_examples: int) -> dict:
    """Overrides for a tiny task: train, dev and test files, its labels, a task teacher, short runs."""
    return {
        "task.train_file": str(write_task(folder / "train.csv", train_examples)),
        "task.dev_files": [str(write_task(folder / "dev.csv", 16, seed=1)), str(write_task(folder / "test.csv", 16, seed=2))],
        "task.labels": ["neg", "pos"],
        "teacher.path": str(save_task_teacher(folder / "teacher")),
        "task.max_seq_length": 24,
        "train.micro_batch_size": 8,
        "train.epochs": 1,
        "eval.every": 2,
    }


def test_compare_trains_and_reports_dev_and_test_of_the_dev_selected_checkpoint(tmp_path):
    setting = {
        **tiny_task(tmp_path, 48),
        "student.num_layers": 2,
        "codir.num_negatives": 8,
        "codir.projection_dim": 16,
        "output.export": True,
    }
    rows = compare.compare(variants="kd", beta="0.1", tau="0.2", k="8", seeds=2, out=str(tmp_path / "out"), **setting)
    assert [(r["name"], r["seed"]) for r in rows] == [("kd", 1), ("codir_b0.1_t0.2_k8", 1), ("kd", 2), ("codir_b0.1_t0.2_k8", 2)]
    for row in rows:
        history = json.loads((tmp_path / "out/runs" / f"{row['name']}_seed{row['seed']}" / "student/eval_results.json").read_text())
        assert row["step"] == history["best"]["step"]  # the checkpoint the run kept and exported
        assert row["test"] == next(e for e in history["history"] if e["step"] == row["step"])["metrics"]["test"]["accuracy"]
    assert "| CE + KD + CoDIR, β 0.1, τ 0.2, K 8 |" in (tmp_path / "out/results.md").read_text()
    assert all(r["gradient_ratio"] > 0 for r in rows if r["name"] != "kd")  # logged on every logging step
    assert all(r["gradient_ratio"] == "" for r in rows if r["name"] == "kd")  # no intermediate term
    assert "| CE + KD + CoDIR, β 0.1, τ 0.2, K 8 | " in (tmp_path / "out/results.md").read_text().split("Does the term do anything?")[1]
    assert not (tmp_path / "out/runs/kd_seed2/checkpoints").exists()  # removed after each run
    (authors,) = compare.compare(variants="kd_codir_authors", beta="", seeds=1, out=str(tmp_path / "authors"), **setting)
    assert authors["name"] == "kd_codir_authors"
    assert 0 <= authors["test"] <= 1
    card = (tmp_path / "authors/runs/kd_codir_authors_seed1/student/README.md").read_text()
    for made in ("| layer map (teacher layer of each student layer) | [1, 3] |", "| pooling | cls |", "objective crd_nce", "momentum 0.5"):
        assert made in card, made


def test_pre_fine_pretrains_with_and_without_codir_and_finetunes_both_on_the_same_seeds(tmp_path, tiny_teacher):
    setting = tiny_task(tmp_path, 32)
    corpus = str(write_corpus(tmp_path / "corpus.txt", documents=40))
    out = tmp_path / "out"
    rows = pre_fine.pre_fine("rotten_tomatoes", seeds=2, steps=2, out=str(out), corpus=corpus, pretrain_teacher=str(tiny_teacher), **setting)
    assert [[r["seed"] for r in rows[arm]] for arm in ("codir", "mlm")] == [[1, 2], [1, 2]]
    assert read_json(out / "pre_codir/student/config.json") == read_json(out / "pre_mlm/student/config.json")  # only the loss differs
    cards = {arm: (out / f"pre_{arm}/student/README.md").read_text() for arm in rows}
    assert "codir 1.0" in cards["codir"]
    assert "codir 0.0" in cards["mlm"]
    tests = {arm: [100 * r["test"] for r in rows[arm]] for arm in rows}
    mean, low, high = compare.paired_interval(tests["codir"], tests["mlm"])
    assert f"paired over 2 seeds: {mean:+.2f} [{low:+.2f}, {high:+.2f}] (95 % CI)." in (out / "pre_fine.md").read_text()


def test_convention_splits_keep_the_party_mix(tmp_path):
    splits = {name: read_split(path) for name, path in write_conventions_by_speaker(tmp_path, 1500, 500, 800).items()}
    shares = {name: sum(r["label"] == "democrat" for r in rows) / len(rows) for name, rows in splits.items()}
    assert max(shares.values()) - min(shares.values()) < 0.01, shares
