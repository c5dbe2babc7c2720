"""Crash-safe, resumable stages.

Each stage has a fingerprint: a digest of the recipe settings it uses and of the fingerprint of
the stage before it. Its record (`work/<stage>.state.json`, kept outside the stage's folder so
img2dataset never mistakes it for one of its shard stats) says which fingerprint its outputs were
made with and whether it completed. On a rerun:
- same fingerprint, completed  -> the stage is skipped;
- same fingerprint, incomplete -> the stage resumes: parts already written are kept (every part
  is written under a temporary name and renamed, so a part that exists is whole);
- other fingerprint            -> the stage's outputs are removed and it runs from scratch, and
  so does every stage after it (their fingerprints include this one).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from cnclip._common.atomic import atomic_path, write_json_atomic


def fingerprint(*parts: Any) -> str:
    payload = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


@dataclass
class StageState:
    work_dir: Path
    stage: str
    fingerprint: str
    outputs: tuple[Path, ...]

    @property
    def record(self) -> Path:
        return self.work_dir / f"{self.stage}.state.json"

    def _read(self) -> dict:
        try:
            return json.loads(self.record.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}

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
            if output.is_dir():
                shutil.rmtree(output)
            elif output.exists():
                output.unlink()
        write_json_atomic(self.record, {"stage": self.stage, "fingerprint": self.fingerprint, "complete": False})
        return False

    def finish(self, summary: dict | None = None) -> None:
        write_json_atomic(
            self.record,
            {"stage": self.stage, "fingerprint": self.fingerprint, "complete": True, "summary": summary or {}},
        )

    def reopen(self) -> None:
        """Mark incomplete but keep its parts: the next run resumes and redoes what is missing."""
        record = self._read()
        if record:
            write_json_atomic(self.record, {**record, "complete": False})

    def discard(self) -> None:
        """Forget the stage: the next run removes its outputs and starts it from scratch."""
        self.record.unlink(missing_ok=True)

    @property
    def summary(self) -> dict:
        return self._read().get("summary", {})


def write_parquet_atomic(frame: pl.DataFrame | pl.LazyFrame, path: Path) -> None:
    """Write under a temporary name, then rename: a part that exists is always complete."""
    with atomic_path(path) as tmp:
        if isinstance(frame, pl.LazyFrame):
            frame.sink_parquet(tmp)
        else:
            frame.write_parquet(tmp)
