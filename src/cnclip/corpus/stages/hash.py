"""Hash stage: one Parquet part of (uid, phash) per download part, the pHash of each stored image."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import polars as pl

from cnclip.corpus.manifests.schemas import HASHES
from cnclip.corpus.ops.phash import iter_tar_images, phash_bytes
from cnclip.corpus.runtime import storage
from cnclip.corpus.runtime.commit import is_committed
from cnclip.corpus.runtime.engine import Engine, default_engine
from cnclip.corpus.runtime.layout import BuildLayout, at
from cnclip.corpus.runtime.stage import Stage, StageContext
from cnclip.corpus.stages.download_attempts import has_attempts, scan_attempts

HASH_VERSION = "phash-draft-v1"  # bump when hash values change, so hash parts are recomputed


def hash_download_part(paths: tuple[Path | str, dict[str, int], Path | str]) -> int:
    """img2dataset tar + its successes' (member key -> uid) -> hash part; returns the number of
    images hashed. A part with no success has no tar worth opening and gives an empty part."""
    tar_path, uid_of, out_path = paths
    keys: list[str] = []

    def images() -> Iterator[bytes]:  # streamed: one image in memory at a time, hashes batched
        if not uid_of:
            return
        with storage.open_file(tar_path) as stream:
            for key, data in iter_tar_images(stream):
                if key in uid_of:  # an image of a row whose latest attempt is elsewhere is not this part's
                    keys.append(key)
                    yield data

    hashes = phash_bytes(images())
    frame = pl.DataFrame(
        {"uid": [uid_of[k] for k in keys], "phash": hashes}, schema={"uid": pl.Int64, "phash": pl.UInt64}
    )
    HASHES.write(frame.sort("uid"), out_path)
    return frame.height


def _tasks(download_dir: Path | str, hash_dir: Path | str) -> list[tuple[Path | str, dict, Path | str]]:
    """(tar, key -> uid of its successes, hash part) per download part of the attempts table."""
    parts = (
        scan_attempts(download_dir)
        .group_by("part")
        .agg(pl.col("key").filter(pl.col("status") == "success"), pl.col("uid").filter(pl.col("status") == "success"))
        .sort("part")
        .collect()
    )
    return [
        (at(download_dir, f"{part:05d}.tar"), dict(zip(keys, uids, strict=True)), at(hash_dir, f"{part:05d}.parquet"))
        for part, keys, uids in parts.iter_rows()
    ]


def run_hash_stage(download_dir: Path | str, hash_dir: Path | str, processes: int | None = None,
                   engine: Engine | None = None) -> dict:
    """One task per download part of the attempts table (their latest attempts only) not hashed
    yet; `processes` overrides the engine's."""
    engine = engine or default_engine()
    storage.make_dirs(hash_dir)
    tasks = _tasks(download_dir, hash_dir) if has_attempts(download_dir) else []
    todo = [t for t in tasks if not is_committed(t[2])]
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
