"""Graceful stops: SIGUSR1/SIGTERM (SLURM's warning before a time limit or preemption) or a stop file make
every rank stop at the same step boundary, after a checkpoint."""

from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path

import torch

from .distributed import any_rank, print0, rank

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class StopRequest:
    """Notes a stop signal (or the stop file, looked at by rank 0) and lets all ranks agree on it each step."""

    def __init__(self, stop_file: Path | None):
        self.stop_file = stop_file
        self.received: str | None = None  # name of the signal, or "stop file"
        self._previous = {sig: signal.signal(sig, self._note) for sig in STOP_SIGNALS}
        if stop_file is not None and rank() == 0:
            stop_file.unlink(missing_ok=True)  # left by the run that was stopped: this one resumes

    def _note(self, signum, frame) -> None:
        self.received = signal.Signals(signum).name

    def agreed(self, device: torch.device) -> bool:
        """True on every rank once any rank has been asked to stop (one tiny all-reduce per step)."""
        if self.received is None and self.stop_file is not None and rank() == 0 and self.stop_file.exists():
            self.received = f"stop file {self.stop_file}"
        return any_rank(self.received is not None, device)

    def close(self) -> None:
        """Give the signals back to their previous handlers."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def report(self, step: int) -> None:
        print0(
            f"codir-ds: stopped at step {step} on {self.received or 'another rank’s request'}; checkpoint step_{step} "
            f"written; run the same command again to resume"
        )


def end_of_step(stop: StopRequest, step: int, last: int, every: int, device: torch.device, save: Callable[[], object]) -> bool:
    """Checkpoint when due (periodically, at the run's last step, or when stopping); True when the run must stop now."""
    stopping = stop.agreed(device)
    if checkpoint_due(step, last, every, stopping):
        save()
    if stopping:
        stop.report(step)
    return stopping


def checkpoint_due(step: int, last: int, every: int, stopping: bool) -> bool:
    """Checkpoint at the run's last step, every `every` steps, and when stopping early."""
    return step == last or stopping or bool(every and step % every == 0)
