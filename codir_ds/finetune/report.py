"""Teacher vs student after stage 2: dev score, size and inference speed, from the exported folders alone."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification

from ..runtime.errors import CodirError


def model_report(folder: str | Path, batch_size: int, seq_length: int, repeats: int) -> dict:
    """Best dev score (from the run's eval_results.json), parameter count and median batch inference time."""
    folder = Path(folder)
    results_file = folder / "eval_results.json"
    if not results_file.is_file():
        raise CodirError(f"report: {folder} is not a codir-ds finetuning export (no eval_results.json)")
    best = json.loads(results_file.read_text())["best"]
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    inputs = torch.randint(1000, model.config.vocab_size, (batch_size, seq_length), generator=torch.Generator().manual_seed(0))
    times = []
    with torch.inference_mode():
        model(input_ids=inputs)  # warm-up
        for _ in range(repeats):
            start = time.perf_counter()
            model(input_ids=inputs)
            times.append(time.perf_counter() - start)
    return {
        "metric": best["metric"],
        "score": best["score"],
        "params": sum(p.numel() for p in model.parameters()),
        "seconds": statistics.median(times),
        "layers": model.config.num_hidden_layers,
    }


def compare_teacher_student(teacher: str, student: str, batch_size: int = 32, seq_length: int = 64, repeats: int = 5) -> dict:
    """Print and return both reports and the student/teacher ratios (one process, same input)."""
    reports = {name: model_report(path, batch_size, seq_length, repeats) for name, path in (("teacher", teacher), ("student", student))}
    t, s = reports["teacher"], reports["student"]
    print(f"{'':8} {'layers':>6} {'params':>10} {t['metric']:>14} {'ms/batch':>9}")
    for name, r in reports.items():
        print(f"{name:8} {r['layers']:>6} {r['params'] / 1e6:>9.2f}M {r['score']:>14.4f} {r['seconds'] * 1e3:>9.1f}")
    ratios = {"size": s["params"] / t["params"], "speedup": t["seconds"] / s["seconds"], "score_retained": s["score"] / t["score"]}
    print(
        f"student/teacher: {ratios['size']:.2f}x the parameters, {ratios['speedup']:.2f}x the inference speed "
        f"(batch {batch_size} x {seq_length} tokens, median of {repeats}), {ratios['score_retained'] * 100:.1f}% of the teacher's {t['metric']}"
    )
    return {**reports, "ratios": ratios}
