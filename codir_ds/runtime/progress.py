"""Progress of a long step: a tqdm bar on a terminal, plain lines elsewhere (SLURM logs, pipes), where a bar's
carriage returns would pile up as one unreadable line."""

from __future__ import annotations

import sys
import time

from tqdm.auto import tqdm

PLAIN_EVERY_SECONDS = 30.0  # plain lines at most this often


def on_terminal() -> bool:
    return sys.stdout.isatty()


def progress(total: int, unit: str, desc: str):
    """A context manager with `update(n)`: a bar when stdout is a terminal, else a line every PLAIN_EVERY_SECONDS."""
    if on_terminal():
        return tqdm(total=total, unit=unit, desc=desc, mininterval=1.0)
    return PlainProgress(total, unit, desc)


class PlainProgress:
    """`desc: done/total unit (share), seconds` printed to stdout, at most every PLAIN_EVERY_SECONDS."""

    def __init__(self, total: int, unit: str, desc: str):
        self.total, self.unit, self.desc, self.done = total, unit, desc, 0
        self.start = self.last = time.perf_counter()

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc) -> None:
        pass

    def update(self, n: int) -> None:
        self.done += n
        now = time.perf_counter()
        if now - self.last >= PLAIN_EVERY_SECONDS:
            self.last = now
            share = f" ({self.done / self.total:.0%})" if self.total else ""
            print(f"{self.desc}: {self.done:,}/{self.total:,} {self.unit}{share}, {now - self.start:.0f} s", flush=True)
