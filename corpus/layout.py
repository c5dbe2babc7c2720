"""Where each stage reads and writes: one place that knows the build's folder layout."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .recipe import Recipe


@dataclass(frozen=True)
class BuildLayout:
    output_dir: Path
    manifest_dir: Path

    @classmethod
    def of(cls, recipe: Recipe) -> "BuildLayout":
        return cls(Path(recipe.output_dir), Path(recipe.manifest_dir))

    @property
    def work(self) -> Path:
        return self.output_dir / "work"

    # ingest: one Parquet part per input file, schema in manifests/README.md ("candidates")
    @property
    def ingest_dir(self) -> Path:
        return self.work / "ingest"

    # text: normalized parts (every row, with its reason), then accepted/ and rejected/ parts
    @property
    def text_dir(self) -> Path:
        return self.work / "text"

    @property
    def text_accepted_dir(self) -> Path:
        return self.text_dir / "accepted"

    @property
    def text_rejected_dir(self) -> Path:
        return self.text_dir / "rejected"

    # download: img2dataset's own output folder (tar + parquet + stats per part)
    @property
    def download_dir(self) -> Path:
        return self.work / "download"

    @property
    def hash_dir(self) -> Path:
        return self.work / "hash"

    @property
    def dedup_decisions(self) -> Path:
        return self.work / "dedup" / "decisions.parquet"

    @property
    def shard_plan(self) -> Path:
        return self.work / "shard" / "plan.parquet"

    @property
    def sample_web_dir(self) -> Path:
        return self.output_dir / "sample_web"

    @property
    def shards_dir(self) -> Path:
        return self.output_dir / "shards"

    @property
    def samples_dir(self) -> Path:
        return self.manifest_dir / "samples"

    @property
    def rejected_dir(self) -> Path:
        return self.manifest_dir / "rejected"

    @property
    def funnel_path(self) -> Path:
        return self.manifest_dir / "funnel.json"


def write_json_atomic(path: Path, payload: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(payload, ensure_ascii=False, indent=2, sort_keys=False), encoding="utf-8")
    os.replace(tmp, path)

