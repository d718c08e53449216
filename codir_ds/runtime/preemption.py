"""Graceful stops: SIGUSR1/SIGTERM (SLURM's warning before a time limit or preemption), Ctrl-C (SIGINT) or a
stop file make every rank stop at the same step boundary, after a checkpoint; a second Ctrl-C aborts at once.
A stopped run exits with `EXIT_STOPPED`, which the sbatch scripts take as "requeue"."""

from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path

from .distributed import print0, rank
from .errors import CodirError

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)
EXIT_STOPPED = 75  # EX_TEMPFAIL: stopped before train.max_steps, checkpointed; run again (requeue) to go on
STOP_FILE_MAX_BYTES = 64  # a stop file is empty or a word (`touch STOP`, `echo stop > STOP`); anything else is not ours


class StopRequest:
    """Notes a stop signal (or the stop file, looked at by rank 0) and lets all ranks agree on it each step."""

    def __init__(self, stop_file: Path | None):
        self.stop_file = stop_file
        self.received: str | None = None  # name of the signal, or "stop file"
        self._previous = {sig: signal.signal(sig, self._note) for sig in STOP_SIGNALS}

    def _note(self, signum, frame) -> None:
        self.received = signal.Signals(signum).name
        if signum == signal.SIGINT:  # a second Ctrl-C does not wait for the step boundary
            signal.signal(signal.SIGINT, signal.default_int_handler)

    def requested(self) -> bool:
        """Whether this rank has been asked to stop (ranks agree on it in the loop's one all-reduce per step)."""
        if self.received is None and self.stop_file is not None and rank() == 0 and self.stop_file.exists():
            self.received = f"stop file {self.stop_file}"
        return self.received is not None

    def close(self) -> None:
        """Give the signals back to their previous handlers."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def report(self, step: int) -> None:
        print0(
            f"codir-ds: stopped at step {step} on {self.received or 'another rank’s request'}; checkpoint step_{step} "
            f"written; run the same command again to resume (exit code {EXIT_STOPPED})"
        )


def clear_stop_file(path: Path) -> None:
    """Remove the stop file a stopped run left (this run resumes it); refuse a path holding anything else."""
    if not path.exists() and not path.is_symlink():
        return
    if not is_stop_file(path):
        raise CodirError(
            f"checkpoint.stop_file: {path} exists and is not a stop file (an empty file, or one word); codir-ds "
            "removes its stop file at start-up, so name a path that holds nothing of yours"
        )
    path.unlink()


def is_stop_file(path: Path) -> bool:
    """A regular file that is empty or holds one word: what `touch` or a script makes to ask for a stop."""
    if not path.is_file() or path.is_symlink() or path.stat().st_size > STOP_FILE_MAX_BYTES:
        return False
    content = path.read_bytes().strip()
    return not content or content.isalnum()


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
