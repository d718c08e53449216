"""Durable, atomic file operations: everything is written under a temporary name, flushed to disk (fsync) and
renamed into place, then the folder holding it is flushed, so a crash or power loss leaves the old version
or the new one, never a mix.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

PARTIAL = ".partial"  # a folder being written; never read, removed by the next writer
REPLACED = ".replaced"  # the previous version of a folder during its replacement; restored if the swap died


def fsync(path: Path) -> None:
    """Flush a file's or a folder's contents (a folder: its entries) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """Flush every file and folder under `folder`, the folder itself last."""
    for root, _, names in os.walk(folder, topdown=False):
        for name in names:
            fsync(Path(root, name))
        fsync(Path(root))


def write_text(path: Path, text: str) -> None:
    """Replace `path` with `text` atomically and durably."""
    write_bytes(path, text.encode())


def write_bytes(path: Path, data: bytes) -> None:
    """Replace `path` with `data` atomically and durably."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fsync(path.parent)


def publish(partial: Path, final: Path) -> None:
    """Make the finished folder `partial` visible as `final`, replacing any earlier `final`.

    The earlier version is renamed to `<final>.replaced` first and deleted only once the new one is in place;
    `recover` puts it back if the process died between the two renames, so a complete `final` always exists.
    """
    fsync_tree(partial)
    old = final.with_name(final.name + REPLACED)
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(partial, final)
    fsync(final.parent)
    shutil.rmtree(old, ignore_errors=True)


def recover(directory: Path) -> None:
    """Undo what a crash in `publish` left in `directory`: a `<name>.replaced` whose `<name>` is missing is restored."""
    for old in directory.glob(f"*{REPLACED}"):
        final = old.with_name(old.name.removesuffix(REPLACED))
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(old, final)


def readable_per_umask(folder: Path) -> None:
    """Give the files under `folder` the permissions a plain `open()` would (some writers create them 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    for root, _, names in os.walk(folder):
        for name in names:
            os.chmod(Path(root, name), 0o666 & ~umask)
        os.chmod(root, 0o777 & ~umask)
