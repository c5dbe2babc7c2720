"""Shard stage: final WebDataset tars, the samples/ and rejected/ manifests, and sizes.json.

Samples are ordered by uid (source order, then row order) whatever order img2dataset's threads
finished in, so the same inputs give the same keys and the same tar bytes. Each output shard is
written by its own task, reading image bytes straight out of img2dataset's tars by member.
"""

from __future__ import annotations

import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import webdataset as wds

from .engine import LocalEngine
from .layout import BuildLayout, replace_dir, write_json_atomic
from .recipe import Recipe

# Fixed tar member times make shards byte-identical across rebuilds.
TAR_MTIME = 0
SAMPLE_FIELDS = [
    "key", "shard", "uid", "source", "row", "url", "caption", "caption_raw",
    "width", "height", "original_width", "original_height", "sha256",
]
REJECTED_FIELDS = ["uid", "source", "row", "url", "caption_raw", "caption", "stage", "reason", "detail"]


def scan_accepted(layout: BuildLayout) -> pl.LazyFrame:
    parts = sorted(layout.text_accepted_dir.glob("*.parquet"))
    return pl.concat([pl.scan_parquet(p) for p in parts], how="diagonal_relaxed")


def scan_downloads(layout: BuildLayout) -> pl.LazyFrame:
    return pl.scan_parquet(layout.download_dir / "*.parquet", include_file_paths="download_parquet").select(
        "uid", "key", "status", "error_message", "width", "height", "original_width", "original_height", "sha256",
        "download_parquet",
    )


def plan_shards(recipe: Recipe) -> int:
    """Assign every downloaded sample its final shard and key; returns the number of samples."""
    layout = BuildLayout.of(recipe)
    per_shard = recipe.shard.samples_per_shard
    digits = len(str(per_shard - 1))
    successes = scan_downloads(layout).filter(pl.col("status") == "success").select(
        "uid",
        pl.col("key").alias("download_key"),
        pl.col("download_parquet").str.replace(r"\.parquet$", ".tar").alias("download_tar"),
        "width", "height", "original_width", "original_height", "sha256",
    )
    plan = (
        scan_accepted(layout)
        .join(successes, on="uid", how="inner")
        .sort("uid")
        .with_row_index("position")
        .with_columns((pl.col("position") // per_shard).cast(pl.Int64).alias("shard"))
        .with_columns(
            (
                pl.col("shard").cast(pl.String).str.zfill(5)
                + (pl.col("position") % per_shard).cast(pl.String).str.zfill(digits)
            ).alias("key")
        )
        .drop("position")
    )
    layout.shard_plan.parent.mkdir(parents=True, exist_ok=True)
    plan.sink_parquet(layout.shard_plan)
    return pl.scan_parquet(layout.shard_plan).select(pl.len()).collect().item()


@dataclass(frozen=True)
class _ShardTask:
    plan: Path
    shard: int
    shards_dir: Path
    samples_dir: Path
    image_extension: str


def write_shard(task: _ShardTask) -> int:
    """One output tar (written under a temporary name, then renamed) and its manifest part."""
    rows = pl.scan_parquet(task.plan).filter(pl.col("shard") == task.shard).collect()
    name = f"{task.shard:05d}"
    tar_path = task.shards_dir / f"{name}.tar"
    tmp = task.shards_dir / f".{name}.tar.tmp{os.getpid()}"
    extras = [c for c in rows.columns if c not in SAMPLE_FIELDS and not c.startswith("download_")]
    sources: dict[str, tarfile.TarFile] = {}
    try:
        with open(tmp, "wb") as stream, wds.TarWriter(stream, mtime=TAR_MTIME) as writer:
            for row in rows.iter_rows(named=True):
                tar = sources.get(row["download_tar"])
                if tar is None:
                    tar = sources[row["download_tar"]] = tarfile.open(row["download_tar"])
                member = tar.extractfile(f"{row['download_key']}.{task.image_extension}")
                metadata = {field: row[field] for field in SAMPLE_FIELDS + extras}
                writer.write(
                    {
                        "__key__": row["key"],
                        task.image_extension: member.read(),
                        "txt": row["caption"],
                        "json": json.dumps(metadata, ensure_ascii=False, default=str).encode("utf-8"),
                    }
                )
    finally:
        for tar in sources.values():
            tar.close()
    os.replace(tmp, tar_path)
    rows.select(SAMPLE_FIELDS + extras).write_parquet(task.samples_dir / f"{name}.parquet")
    return rows.height


def write_download_rejects(layout: BuildLayout) -> None:
    """Rows img2dataset failed on, and rows it never reported (a crashed part), with reasons."""
    accepted = scan_accepted(layout)
    downloads = scan_downloads(layout) if any(layout.download_dir.glob("*.parquet")) else None
    frames = []
    if downloads is not None:
        failed = downloads.filter(pl.col("status") != "success").select(
            "uid",
            pl.lit("download").alias("stage"),
            pl.format("download:{}", "status").alias("reason"),
            pl.col("error_message").str.strip_chars().alias("detail"),
        )
        frames.append(accepted.join(failed, on="uid", how="inner"))
        reported = downloads.select("uid")
    else:
        reported = pl.LazyFrame(schema={"uid": pl.Int64})
    missing = accepted.join(reported, on="uid", how="anti").with_columns(
        pl.lit("download").alias("stage"),
        pl.lit("download:not_attempted").alias("reason"),
        pl.lit("img2dataset reported no status for this row").alias("detail"),
    )
    frames.append(missing)
    rejects = pl.concat(frames, how="diagonal_relaxed").sort("uid").collect()
    if rejects.height:
        ordered = REJECTED_FIELDS + [c for c in rejects.columns if c not in REJECTED_FIELDS]
        rejects.select(ordered).write_parquet(layout.rejected_dir / "download.parquet")


def collect_text_rejects(layout: BuildLayout) -> None:
    for part in sorted(layout.text_rejected_dir.glob("*.parquet")):
        frame = pl.read_parquet(part)
        ordered = REJECTED_FIELDS + [c for c in frame.columns if c not in REJECTED_FIELDS]
        frame.select(ordered).write_parquet(layout.rejected_dir / f"text-{part.name}")


@dataclass
class ShardReport:
    samples: int
    shards: int


def run_shard_stage(recipe: Recipe) -> ShardReport:
    layout = BuildLayout.of(recipe)
    replace_dir(layout.shards_dir)
    replace_dir(layout.samples_dir)
    replace_dir(layout.rejected_dir)
    collect_text_rejects(layout)
    if not any(layout.text_accepted_dir.glob("*.parquet")):
        write_json_atomic(layout.shards_dir / "sizes.json", {})
        return ShardReport(0, 0)
    write_download_rejects(layout)
    total = plan_shards(recipe) if any(layout.download_dir.glob("*.parquet")) else 0
    per_shard = recipe.shard.samples_per_shard
    count = -(-total // per_shard)
    tasks = [
        _ShardTask(layout.shard_plan, shard, layout.shards_dir, layout.samples_dir, recipe.image.encode_format)
        for shard in range(count)
    ]
    written = LocalEngine(recipe.shard.processes).map_parts(write_shard, tasks, "shard: write tars")
    # The per-shard sample counts open_clip_train reads for --train-num-samples.
    sizes = {f"{t.shard:05d}.tar": n for t, n in zip(tasks, written)}
    write_json_atomic(layout.shards_dir / "sizes.json", sizes)
    return ShardReport(sum(written), count)

