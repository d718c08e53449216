"""Task metrics against scikit-learn and scipy on random predictions."""

import numpy as np
import pytest
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from codir_ds.finetune.metrics import accuracy, compute_metrics, f1, matthews, pearson, spearman


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("classes", [2, 3, 5])
def test_classification_metrics_match_sklearn(seed, classes):
    rng = np.random.default_rng(seed)
    references, predictions = rng.integers(0, classes, 200), rng.integers(0, classes, 200)
    predictions[:60] = references[:60]  # some signal, so the scores are not all near zero
    assert accuracy(predictions, references) == pytest.approx(accuracy_score(references, predictions), abs=1e-12)
    assert matthews(predictions, references) == pytest.approx(matthews_corrcoef(references, predictions), abs=1e-12)
    if classes == 2:
        assert f1(predictions, references) == pytest.approx(f1_score(references, predictions), abs=1e-12)


def test_degenerate_cases_match_sklearn():
    constant, references = np.zeros(10, dtype=int), np.array([0, 1] * 5)
    assert matthews(constant, references) == matthews_corrcoef(references, constant) == 0.0
    assert f1(constant, references) == pytest.approx(f1_score(references, constant, zero_division=0.0))


@pytest.mark.parametrize("seed", range(5))
def test_correlations_match_scipy_with_ties(seed):
    rng = np.random.default_rng(seed)
    references = rng.integers(0, 6, 150).astype(float)  # STS-B-like 0..5 scores, many ties
    predictions = references + rng.normal(0, 2, 150)
    predictions[::7] = np.round(predictions[::7])  # ties on the prediction side too
    assert pearson(predictions, references) == pytest.approx(pearsonr(predictions, references)[0], abs=1e-12)
    assert spearman(predictions, references) == pytest.approx(spearmanr(predictions, references)[0], abs=1e-12)


def test_compute_metrics_takes_argmax_or_the_single_output():
    logits = np.array([[0.1, 0.9], [2.0, -1.0], [0.0, 0.5]])
    assert compute_metrics(["accuracy"], logits, np.array([1, 0, 0]), regression=False) == {"accuracy": pytest.approx(2 / 3)}
    scores = compute_metrics(["pearson"], np.array([[1.0], [2.0], [3.0]]), np.array([2.0, 4.0, 6.5]), regression=True)
    assert scores["pearson"] == pytest.approx(pearsonr([1, 2, 3], [2, 4, 6.5])[0])
