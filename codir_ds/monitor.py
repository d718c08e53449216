"""Run monitoring on rank 0: TensorBoard scalars and a progress bar with loss and throughput."""
from __future__ import annotations

import time
from pathlib import Path

import torch
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from .distributed import mean_over_ranks, rank

LOSS_TERMS = ("total", "mlm", "ce", "kd", "codir", "mse", "mse_tokens", "cosine")


class Monitor:
    """Writes scalars every `every` steps (rank 0 only) and tracks throughput since the last write."""

    def __init__(self, log_dir: Path, total_steps: int, start_step: int, every: int, progress_bar: bool):
        self.every = every
        self.active = rank() == 0
        self.writer = SummaryWriter(str(log_dir)) if self.active else None
        self.bar = tqdm(total=total_steps, initial=start_step, disable=not (self.active and progress_bar), dynamic_ncols=True)
        self._since, self._samples, self._tokens = time.perf_counter(), 0, 0

    def step(self, step: int, samples: int, tokens: int, scalars: dict[str, float]) -> None:
        """Record one optimizer step of `samples` sequences / `tokens` tokens across all ranks."""
        self._samples += samples
        self._tokens += tokens
        self.bar.update(1)
        if step % self.every:
            return
        elapsed = max(time.perf_counter() - self._since, 1e-9)
        scalars = {**scalars, "throughput/samples_per_s": self._samples / elapsed, "throughput/tokens_per_s": self._tokens / elapsed}
        self._since, self._samples, self._tokens = time.perf_counter(), 0, 0
        self.scalars(step, scalars)
        if self.active:
            self.bar.set_postfix(loss=f"{scalars['loss/total']:.3f}", tok_s=f"{scalars['throughput/tokens_per_s']:.0f}")

    def scalars(self, step: int, scalars: dict[str, float]) -> None:
        """Write extra scalars (e.g. evaluation results) at `step`."""
        if self.active:
            for name, value in scalars.items():
                self.writer.add_scalar(name, value, step)

    def text(self, tag: str, text: str) -> None:
        if self.active:
            self.writer.add_text(tag, text)

    def close(self) -> None:
        self.bar.close()
        if self.active:
            self.writer.close()


def averaged_scalars(local: dict[str, float], device: torch.device) -> dict[str, float]:
    """This rank's step values averaged over all ranks, named for TensorBoard: `loss/<term>`, `codir/<statistic>`."""
    averaged = mean_over_ranks(torch.tensor(list(local.values()), dtype=torch.float64, device=device))
    return {(f"loss/{name}" if name in LOSS_TERMS else f"codir/{name}"): float(v) for name, v in zip(local, averaged)}


def average_terms(micro_steps: list[dict[str, float]]) -> dict[str, float]:
    """One optimizer step's values: the mean over its (gradient-accumulation) micro-steps."""
    return {name: sum(terms[name] for terms in micro_steps) / len(micro_steps) for name in micro_steps[0]}
