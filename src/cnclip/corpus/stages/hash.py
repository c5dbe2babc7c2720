"""Hash stage: one Parquet part of (uid, phash) per download part, the pHash of each stored image."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import polars as pl

from cnclip.corpus.ops.phash import iter_tar_images, phash_bytes
from cnclip.corpus.manifests.schemas import HASHES
from cnclip.corpus.runtime.engine import Engine, default_engine
from cnclip.corpus.runtime.layout import BuildLayout
from cnclip.corpus.runtime.stage import Stage, StageContext

HASH_VERSION = "phash-draft-v1"  # bump when hash values change, so hash parts are recomputed


def hash_download_part(paths: tuple[Path, Path, Path]) -> int:
    """img2dataset part (tar + parquet) -> hash part; returns the number of images hashed."""
    tar_path, parquet_path, out_path = paths
    uid_of = dict(
        pl.read_parquet(parquet_path, columns=["key", "uid", "status"])
        .filter(pl.col("status") == "success")
        .select("key", "uid")
        .iter_rows()
    )
    keys: list[str] = []

    def images() -> Iterator[bytes]:  # streamed: one image in memory at a time, hashes batched
        for key, data in iter_tar_images(tar_path):
            keys.append(key)
            yield data

    hashes = phash_bytes(images())
    frame = pl.DataFrame(
        {"uid": [uid_of[k] for k in keys], "phash": hashes}, schema={"uid": pl.Int64, "phash": pl.UInt64}
    )
    HASHES.write(frame.sort("uid"), out_path)
    return frame.height


def run_hash_stage(download_dir: Path, hash_dir: Path, processes: int | None = None,
                   engine: Engine | None = None) -> dict:
    """Hash every download part not hashed yet; `processes` overrides the engine's."""
    engine = engine or default_engine()
    hash_dir.mkdir(parents=True, exist_ok=True)
    tasks = [
        (tar, tar.with_suffix(".parquet"), hash_dir / tar.with_suffix(".parquet").name)
        for tar in sorted(download_dir.glob("*.tar"))
        if tar.with_suffix(".parquet").exists()
    ]
    todo = [t for t in tasks if not t[2].exists()]
    engine.map_parts(hash_download_part, todo, "hash: pHash of stored images", processes)
    return {"parts": len(tasks)}


class HashStage(Stage):
    """Download parts -> hash parts; its fingerprint covers the hash version. It rejects nothing,
    so the funnel has no row for it. Its workers are `dedup.processes` (default engine.processes)."""

    name = "hash"
    needs = ("download",)
    in_funnel = False

    def extra(self, recipe) -> list:
        return [HASH_VERSION]

    def outputs(self, layout: BuildLayout) -> tuple:
        return (layout.hash_dir,)

    def run(self, context: StageContext) -> dict:
        layout = context.layout
        return run_hash_stage(layout.download_dir, layout.hash_dir, context.recipe.dedup.processes, context.engine)
