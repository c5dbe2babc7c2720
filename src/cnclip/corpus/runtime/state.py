"""Crash-safe, resumable stages.

Each stage has a fingerprint: a digest of the recipe settings it uses and of the fingerprint of
the stage before it. Its record (`work/<stage>.state.json`, kept outside the stage's folder so
img2dataset never mistakes it for one of its shard stats) says which fingerprint its outputs were
made with and whether it completed. On a rerun:
- same fingerprint, completed  -> the stage is skipped;
- same fingerprint, incomplete -> the stage resumes: parts already written are kept (every part
  is written under a temporary name and renamed, or on an object store committed by a marker
  (commit.py), so a part a stage finds is whole);
- other fingerprint            -> the stage's outputs are removed and it runs from scratch, and
  so does every stage after it (their fingerprints include this one).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from cnclip._common.atomic import atomic_path, write_json_atomic
from cnclip.corpus.runtime import storage


def fingerprint(*parts: Any) -> str:
    payload = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


@dataclass
class StageState:
    work_dir: Path | str  # a local folder or a URL (storage.py)
    stage: str
    fingerprint: str
    outputs: tuple[Path | str, ...]

    @property
    def record(self) -> Path | str:
        if storage.is_url(self.work_dir):
            return storage.join(self.work_dir, f"{self.stage}.state.json")
        return Path(self.work_dir) / f"{self.stage}.state.json"

    def _read(self) -> dict:
        try:
            return json.loads(storage.read_text(self.record))
        except (OSError, ValueError):
            return {}

    def _write(self, record: dict) -> None:
        """One whole record: renamed into place locally, one PUT on an object store."""
        if storage.is_url(self.record):
            storage.write_text(self.record, json.dumps(record, ensure_ascii=False, indent=2))
        else:
            write_json_atomic(self.record, record)

    @property
    def complete(self) -> bool:
        record = self._read()
        return record.get("fingerprint") == self.fingerprint and record.get("complete", False)

    def begin(self) -> bool:
        """Prepare to run; returns True when resuming parts made with the same settings."""
        record = self._read()
        if record.get("fingerprint") == self.fingerprint:
            return True
        for output in self.outputs:
            storage.remove(output)
        self._write({"stage": self.stage, "fingerprint": self.fingerprint, "complete": False})
        return False

    def finish(self, summary: dict | None = None) -> None:
        self._write({"stage": self.stage, "fingerprint": self.fingerprint, "complete": True,
                     "summary": summary or {}})

    def reopen(self) -> None:
        """Mark incomplete but keep its parts: the next run resumes and redoes what is missing."""
        record = self._read()
        if record:
            self._write({**record, "complete": False})

    def discard(self) -> None:
        """Forget the stage: the next run removes its outputs and starts it from scratch."""
        storage.remove(self.record)

    @property
    def summary(self) -> dict:
        return self._read().get("summary", {})


def write_parquet_atomic(frame: pl.DataFrame | pl.LazyFrame, path: Path | str) -> None:
    """Write under a temporary name, then rename: a part that exists is always complete. On a URL
    the part is committed by its marker instead (commit.py), whole or not at all just the same."""
    if storage.is_url(path):
        from cnclip.corpus.runtime.commit import write_parquet_part

        write_parquet_part(frame, path)
        return
    with atomic_path(path) as tmp:
        if isinstance(frame, pl.LazyFrame):
            frame.sink_parquet(tmp)
        else:
            frame.write_parquet(tmp)
