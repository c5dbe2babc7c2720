"""Hash stage: one Parquet part of (uid, phash) per download part, the pHash of each stored image."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import polars as pl

from cnclip.corpus.ops.phash import iter_tar_images, phash_bytes
from cnclip.corpus.runtime.engine import LocalEngine
from cnclip.corpus.manifests.schemas import HASHES


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


def run_hash_stage(download_dir: Path, hash_dir: Path, processes: int) -> dict:
    hash_dir.mkdir(parents=True, exist_ok=True)
    tasks = [
        (tar, tar.with_suffix(".parquet"), hash_dir / tar.with_suffix(".parquet").name)
        for tar in sorted(download_dir.glob("*.tar"))
        if tar.with_suffix(".parquet").exists()
    ]
    todo = [t for t in tasks if not t[2].exists()]
    LocalEngine(processes).map_parts(hash_download_part, todo, "hash: pHash of stored images")
    return {"parts": len(tasks)}
