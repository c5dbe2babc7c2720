"""Atomic file writes: the one way this project writes a file that others may read or resume from.

A file is written under a temporary name beside its final one (`.NAME.tmpPID`, which
`remove_temporaries` recognises as a crashed writer's leftover) and renamed into place when
whole, so a file that exists under its name is always complete: a resumed build trusts every
part it finds, a reader never sees half a config. `durable=True` also fsyncs the file and its
folder, for what must survive a power cut (training checkpoints), at the price of a disk flush.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


def temporary_name(path: Path) -> Path:
    """Where `path` is written before it is renamed into place (unique per process)."""
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def remove_temporaries(folder: Path) -> None:
    """Leftovers of a crashed writer in `folder`: `.NAME.tmpPID` files."""
    if folder.is_dir():
        for leftover in folder.glob(".*.tmp*"):
            leftover.unlink(missing_ok=True)


def _fsync(path: Path) -> None:
    """Flush `path` (a file, or a folder for the renames in it) to disk, where the platform lets
    a folder be opened; a platform that does not is no reason to fail a write."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | Path, durable: bool = False) -> Iterator[Path]:
    """Yield a temporary path to write `path`'s content to; on success it is renamed to `path`,
    on an exception removed (the previous `path`, if any, stays as it was)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    try:
        yield tmp
        if durable:
            _fsync(tmp)
        os.replace(tmp, path)
        if durable:
            _fsync(path.parent)  # the rename itself survives a crash
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | Path, text: str, durable: bool = False) -> None:
    with atomic_path(path, durable) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | Path, payload: Any, durable: bool = False) -> None:
    write_text_atomic(path, json.dumps(payload, ensure_ascii=False, indent=2), durable)
