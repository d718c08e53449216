"""Run monitoring: TensorBoard scalars (and DeepSpeed's monitors) and one plain log line every `logging.every` steps
(rank 0 writes)."""

from __future__ import annotations

import datetime
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.tensorboard import SummaryWriter

from ..runtime.distributed import mean_over_ranks, print0, rank
from ..method.losses import CONTRASTIVE_STATS


class Monitor:
    """Every `every` steps: averages the step's values over ranks (the only host sync of a step besides the stop check), adds
    throughput, writes TensorBoard scalars and prints one line (no carriage returns: fit for SLURM logs)."""

    def __init__(self, log_dir: Path, total_steps: int, start_step: int, every: int, deepspeed_monitor=None):
        self.every, self.total, self.start = every, total_steps, start_step
        self.writer = SummaryWriter(str(log_dir)) if rank() == 0 else None
        self.deepspeed_monitor = deepspeed_monitor if deepspeed_monitor is not None and deepspeed_monitor.enabled else None
        self._began = self._since = time.perf_counter()
        self._samples = self._tokens = 0

    def step(self, step: int, samples: int, tokens: int, terms: dict[str, torch.Tensor], extra: Callable[[], dict[str, float]]) -> dict[str, float]:
        """Record one optimizer step of `samples` sequences / `tokens` tokens across all ranks. On logging steps,
        write the scalars and return the step's `terms` averaged over ranks, else {}. Every rank calls it:
        a logging step holds one all-reduce."""
        self._samples += samples
        self._tokens += tokens
        if not self.logs(step):
            return {}
        now = time.perf_counter()
        elapsed = max(now - self._since, 1e-9)
        averaged = mean_over_ranks(torch.stack([value.detach().double() for value in terms.values()]))
        values = {name: float(value) for name, value in zip(terms, averaged)}
        scalars = {
            **{_scalar_name(name): value for name, value in values.items()},
            **extra(),
            "throughput/samples_per_s": self._samples / elapsed,
            "throughput/tokens_per_s": self._tokens / elapsed,
        }
        self._since, self._samples, self._tokens = now, 0, 0
        self.scalars(step, scalars)
        eta = (now - self._began) / (step - self.start) * (self.total - step)
        losses = " ".join(f"{name.removeprefix('loss/')} {value:.4f}" for name, value in scalars.items() if name.startswith("loss/"))
        print0(
            f"codir-ds: step {step}/{self.total} {losses} | {scalars['throughput/tokens_per_s']:,.0f} tokens/s "
            f"| ETA {datetime.timedelta(seconds=round(eta))}"
        )
        return values

    def logs(self, step: int) -> bool:
        """Whether `step` is a logging step (every `every` steps and the last)."""
        return step % self.every == 0 or step == self.total

    def scalars(self, step: int, scalars: dict[str, float]) -> None:
        """Write extra scalars (e.g. evaluation results) at `step`, to TensorBoard and to the monitors (csv, wandb,
        comet) the DeepSpeed config enables."""
        if self.writer is not None:
            for name, value in scalars.items():
                self.writer.add_scalar(name, value, step)
        if self.deepspeed_monitor is not None:  # it writes on rank 0 only
            self.deepspeed_monitor.write_events([(name, value, step) for name, value in scalars.items()])

    def text(self, tag: str, text: str) -> None:
        if self.writer is not None:
            self.writer.add_text(tag, text)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _scalar_name(term: str) -> str:
    """TensorBoard name of a step value: `codir/<statistic>` for CoDIR's statistics, `gradients/intermediate_ratio` for
    the gradient-norm ratio (`logging.gradient_ratio`), `loss/<term>` for loss terms."""
    if term == "gradient_ratio":
        return "gradients/intermediate_ratio"
    return f"codir/{term}" if term in CONTRASTIVE_STATS else f"loss/{term}"


def average_terms(micro_steps: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """One optimizer step's values: the mean over its (gradient-accumulation) micro-steps, still on the device."""
    return {name: torch.stack([terms[name] for terms in micro_steps]).mean() for name in micro_steps[0]}
