"""Task metrics as pure functions of predictions and references (numpy arrays)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def accuracy(predictions: np.ndarray, references: np.ndarray) -> float:
    return float(np.mean(predictions == references))


def f1(predictions: np.ndarray, references: np.ndarray) -> float:
    """F1 of the positive class (label 1), as GLUE reports it for MRPC and QQP."""
    true_positive = np.sum((predictions == 1) & (references == 1))
    predicted, actual = np.sum(predictions == 1), np.sum(references == 1)
    return float(2 * true_positive / (predicted + actual)) if predicted + actual else 0.0


def matthews(predictions: np.ndarray, references: np.ndarray) -> float:
    """Matthews correlation (multi-class form, Gorodkin 2004); 0 when a marginal is constant."""
    classes = np.union1d(predictions, references)
    confusion = np.array([[np.sum((references == t) & (predictions == p)) for p in classes] for t in classes], dtype=np.float64)
    samples, correct = confusion.sum(), np.trace(confusion)
    true_totals, predicted_totals = confusion.sum(axis=1), confusion.sum(axis=0)
    numerator = correct * samples - true_totals @ predicted_totals
    denominator = np.sqrt((samples**2 - predicted_totals @ predicted_totals) * (samples**2 - true_totals @ true_totals))
    return float(numerator / denominator) if denominator else 0.0


def pearson(predictions: np.ndarray, references: np.ndarray) -> float:
    x, y = predictions - predictions.mean(), references - references.mean()
    denominator = np.sqrt((x @ x) * (y @ y))
    return float(x @ y / denominator) if denominator else 0.0


def spearman(predictions: np.ndarray, references: np.ndarray) -> float:
    """Pearson correlation of the ranks (ties get their average rank)."""
    return pearson(_average_ranks(predictions), _average_ranks(references))


def _average_ranks(values: np.ndarray) -> np.ndarray:
    order = np.argsort(values, kind="mergesort")
    sorted_values = values[order]
    starts = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])
    ends = np.r_[starts[1:], len(values)]
    ranks = np.empty(len(values), dtype=np.float64)
    for start, end in zip(starts, ends):
        ranks[order[start:end]] = (start + end + 1) / 2  # mean of 1-based ranks start+1..end
    return ranks


METRICS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "accuracy": accuracy,
    "f1": f1,
    "matthews": matthews,
    "pearson": pearson,
    "spearman": spearman,
}
REGRESSION_METRICS = ("pearson", "spearman")


def compute_metrics(names: list[str], logits: np.ndarray, references: np.ndarray, regression: bool) -> dict[str, float]:
    """Each named metric of the model outputs `logits` ([n, classes], or [n, 1] for regression)."""
    predictions = logits[:, 0] if regression else logits.argmax(axis=1)
    return {name: METRICS[name](predictions, references) for name in names}
