"""Graceful stops: SIGUSR1/SIGTERM (SLURM's warning before a time limit or preemption), Ctrl-C (SIGINT) or a
stop file make every rank stop at the same step boundary, after a checkpoint; a second Ctrl-C aborts at once.
A stop file counts only when created or touched after the run started, so one left by an earlier run (or a
user's file of that name) never stops a run and never needs deleting. A stopped run exits with `EXIT_STOPPED`,
which the sbatch scripts take as "requeue"."""

from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path

from .distributed import print0, rank

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)
EXIT_STOPPED = 75  # EX_TEMPFAIL: stopped before train.max_steps, checkpointed; run again (requeue) to go on


class StopRequest:
    """Notes a stop signal (or the stop file, looked at by rank 0) and lets all ranks agree on it each step. The stop
    file counts once modified after `since_ns` (the run's start, in the file system's st_mtime_ns)."""

    def __init__(self, stop_file: Path | None, since_ns: int):
        self.stop_file, self.since_ns = stop_file, since_ns
        self.received: str | None = None  # name of the signal, or "stop file"
        self._previous = {sig: signal.signal(sig, self._note) for sig in STOP_SIGNALS}

    def _note(self, signum, frame) -> None:
        self.received = signal.Signals(signum).name
        if signum == signal.SIGINT:  # a second Ctrl-C does not wait for the step boundary
            signal.signal(signal.SIGINT, signal.default_int_handler)

    def requested(self) -> bool:
        """Whether this rank has been asked to stop (ranks agree on it in the loop's one all-reduce per step)."""
        if self.received is None and self.stop_file is not None and rank() == 0 and self._touched():
            self.received = f"stop file {self.stop_file}"
        return self.received is not None

    def _touched(self) -> bool:
        try:
            return self.stop_file.stat().st_mtime_ns > self.since_ns
        except FileNotFoundError:
            return False

    def close(self) -> None:
        """Give the signals back to their previous handlers."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def report(self, step: int) -> None:
        print0(
            f"codir-ds: stopped at step {step} on {self.received or 'another rank’s request'}; checkpoint step_{step} "
            f"written; run the same command again to resume (exit code {EXIT_STOPPED})"
        )


def end_of_step(stop: StopRequest, step: int, last: int, every: int, stopping: bool, save: Callable[[], object]) -> bool:
    """Checkpoint when due (periodically, at the run's last step, or when `stopping`, which every rank agreed on);
    True when the run must stop now."""
    if checkpoint_due(step, last, every, stopping):
        save()
    if stopping:
        stop.report(step)
    return stopping


def checkpoint_due(step: int, last: int, every: int, stopping: bool) -> bool:
    """Checkpoint at the run's last step, every `every` steps, and when stopping early."""
    return step == last or stopping or bool(every and step % every == 0)
