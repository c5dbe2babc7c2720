"""Shard stage: final WebDataset tars, the samples/ and rejected/ manifests, sizes.json, and
checksums.json recording every one of them (integrity.py).

Samples are ordered by uid (source order, then row order) whatever order img2dataset's threads
finished in, so the same inputs give the same keys and the same tar bytes. Each output shard is
written by its own task, reading image bytes straight out of img2dataset's tars by the member the
attempts table names (download_attempts.py); a tar
and its manifest part are renamed into place when whole, so an interrupted stage resumes after
the last complete shard.
"""

from __future__ import annotations

import json
import tarfile
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import webdataset as wds

from cnclip._common.atomic import atomic_path, remove_temporaries, write_json_atomic

from cnclip.corpus.stages.download_attempts import has_attempts, scan_attempts
from cnclip.corpus.runtime.engine import LocalEngine
from cnclip.corpus.manifests.funnel import write_funnel
from cnclip.corpus.ops.phash import hex_digits
from cnclip.corpus.manifests.integrity import write_checksums
from cnclip.corpus.runtime.layout import BuildLayout
from cnclip.corpus.manifests.schemas import REJECTED_SCHEMA, SAMPLE_SCHEMA, conform, keep_column_types
from cnclip.corpus.recipe import Recipe
from cnclip.corpus.runtime.state import write_parquet_atomic

# Fixed tar member times make shards byte-identical across rebuilds.
TAR_MTIME = 0


def scan_accepted(layout: BuildLayout) -> pl.LazyFrame:
    parts = sorted(layout.text_accepted_dir.glob("*.parquet"))
    if not parts:
        return pl.LazyFrame(schema={"uid": pl.Int64, "source": pl.String, "row": pl.Int64, "url": pl.String,
                                    "caption_raw": pl.String, "caption": pl.String})
    return pl.concat([pl.scan_parquet(p) for p in parts], how="diagonal_relaxed")


def _has_downloads(layout: BuildLayout) -> bool:
    return has_attempts(layout.download_dir)


def plan_shards(recipe: Recipe) -> int:
    """Assign every kept sample its final shard and key; returns the number of samples."""
    layout = BuildLayout.of(recipe)
    per_shard = recipe.shard.samples_per_shard
    digits = len(str(per_shard - 1))
    successes = scan_attempts(layout.download_dir).filter(pl.col("status") == "success").select(
        "uid",
        pl.col("key").alias("download_key"),
        (pl.lit(f"{layout.download_dir}/") + pl.col("tar")).alias("download_tar"),
        "width", "height", "original_width", "original_height", "sha256",
    )
    hashes = pl.scan_parquet(layout.hash_dir / "*.parquet").select("uid", hex_digits(pl.col("phash")).alias("phash"))
    dropped = pl.scan_parquet(layout.dedup_decisions).select("uid")
    plan = (
        scan_accepted(layout)
        .join(successes, on="uid", how="inner")
        .join(dropped, on="uid", how="anti")
        .join(hashes, on="uid", how="left")
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
    write_parquet_atomic(plan, layout.shard_plan)
    return pl.scan_parquet(layout.shard_plan).select(pl.len()).collect().item()


@dataclass(frozen=True)
class _ShardTask:
    plan: Path
    shard: int
    shards_dir: Path
    samples_dir: Path
    image_extension: str
    keep_columns: dict  # name -> polars type, every source's (manifest_schema.py)

    @property
    def tar_path(self) -> Path:
        return self.shards_dir / f"{self.shard:05d}.tar"

    @property
    def manifest_path(self) -> Path:
        return self.samples_dir / f"{self.shard:05d}.parquet"


def write_shard(task: _ShardTask) -> int:
    """One output tar and its manifest part, each written under a temporary name then renamed."""
    rows = pl.scan_parquet(task.plan).filter(pl.col("shard") == task.shard).collect()
    published = conform(rows, SAMPLE_SCHEMA, task.keep_columns)
    sources: dict[str, tarfile.TarFile] = {}
    try:
        with atomic_path(task.tar_path) as tmp:
            with open(tmp, "wb") as stream, wds.TarWriter(stream, mtime=TAR_MTIME) as writer:
                for (download_tar, download_key), metadata in zip(
                    rows.select("download_tar", "download_key").iter_rows(), published.iter_rows(named=True)
                ):
                    tar = sources.get(download_tar)
                    if tar is None:
                        tar = sources[download_tar] = tarfile.open(download_tar)
                    member = tar.extractfile(f"{download_key}.{task.image_extension}")
                    writer.write(
                        {
                            "__key__": metadata["key"],
                            task.image_extension: member.read(),
                            "txt": metadata["caption"],
                            "json": json.dumps(metadata, ensure_ascii=False, default=str).encode("utf-8"),
                        }
                    )
            # The manifest goes in first: a shard counts as done only when its tar is in place too.
            write_parquet_atomic(published, task.manifest_path)
    finally:
        for tar in sources.values():
            tar.close()
    return rows.height


def _ordered(frame: pl.DataFrame, keep_columns: dict) -> pl.DataFrame:
    return conform(frame, REJECTED_SCHEMA, keep_columns).sort("uid")


def _key_of_kept(layout: BuildLayout) -> pl.LazyFrame:
    return pl.scan_parquet(layout.shard_plan).select(
        pl.col("uid").alias("duplicate_of_uid"), pl.col("key").alias("duplicate_of")
    )


def write_rejects(layout: BuildLayout, keep_columns: dict) -> list[Path]:
    """rejected/: text-stage rejects, download failures (and rows img2dataset never reported),
    dedup drops; `duplicate_of` names the kept sample's key (or the evaluation image). Every
    part has the one rejected schema; download.parquet and dedup.parquet are written even with
    0 rows, so the folder is never empty."""
    keys = _key_of_kept(layout)
    written = []
    for part in sorted(layout.text_rejected_dir.glob("*.parquet")):
        frame = pl.scan_parquet(part).join(keys, on="duplicate_of_uid", how="left").collect()
        written.append(layout.rejected_dir / f"text-{part.name}")
        write_parquet_atomic(_ordered(frame, keep_columns), written[-1])
    accepted = scan_accepted(layout)
    downloads = scan_attempts(layout.download_dir) if _has_downloads(layout) else None
    reported = downloads.select("uid") if downloads is not None else pl.LazyFrame(schema={"uid": pl.Int64})
    frames = [
        accepted.join(reported, on="uid", how="anti").with_columns(
            pl.lit("download").alias("stage"),
            pl.lit("download:not_attempted").alias("reason"),
            pl.lit("img2dataset reported no status for this row").alias("detail"),
        )
    ]
    if downloads is not None:
        failed = downloads.filter(pl.col("status") != "success").select(
            "uid", pl.lit("download").alias("stage"), "reason", "detail")
        frames.append(accepted.join(failed, on="uid", how="inner"))
        decisions = pl.scan_parquet(layout.dedup_decisions)
        dropped = (
            accepted.join(downloads.select("uid", "width", "height", "original_width", "original_height", "sha256"),
                          on="uid")
            .join(decisions, on="uid", how="inner")
            .join(keys, on="duplicate_of_uid", how="left")
            .with_columns(
                pl.lit("dedup").alias("stage"),
                pl.coalesce("duplicate_of", "duplicate_of_eval").alias("duplicate_of"),
            )
            .drop("duplicate_of_eval")
        )
        frames.append(dropped)
    rejects = pl.concat(frames, how="diagonal_relaxed").collect()
    for stage in ("download", "dedup"):
        part = rejects.filter(pl.col("stage") == stage)
        written.append(layout.rejected_dir / f"{stage}.parquet")
        write_parquet_atomic(_ordered(part, keep_columns), written[-1])
    return written


def run_shard_stage(recipe: Recipe) -> dict:
    """Plan, write every shard not yet written, the rejects and sizes.json; returns the funnel."""
    layout = BuildLayout.of(recipe)
    for folder in (layout.shards_dir, layout.samples_dir, layout.rejected_dir):
        folder.mkdir(parents=True, exist_ok=True)
        remove_temporaries(folder)
    total = 0
    if _has_downloads(layout):
        # The plan is deterministic; one left by an interrupted run of this stage is whole.
        total = (pl.scan_parquet(layout.shard_plan).select(pl.len()).collect().item()
                 if layout.shard_plan.exists() else plan_shards(recipe))
    else:
        write_parquet_atomic(pl.DataFrame(schema={"uid": pl.Int64, "key": pl.String}), layout.shard_plan)
    count = -(-total // recipe.shard.samples_per_shard)
    keep_columns = keep_column_types(layout.ingest_dir)
    tasks = [
        _ShardTask(layout.shard_plan, shard, layout.shards_dir, layout.samples_dir, recipe.image.encode_format,
                   keep_columns)
        for shard in range(count)
    ]
    todo = [t for t in tasks if not (t.tar_path.exists() and t.manifest_path.exists())]
    LocalEngine(recipe.shard.processes).map_parts(write_shard, todo, "shard: write tars")
    rejects = write_rejects(layout, keep_columns)
    # The per-shard sample counts open_clip_train reads for --train-num-samples.
    sizes = {
        t.tar_path.name: pl.scan_parquet(t.manifest_path).select(pl.len()).collect().item() for t in tasks
    }
    write_json_atomic(layout.shards_dir / "sizes.json", sizes)
    funnel = write_funnel(layout, recipe.name)
    published = [t.tar_path for t in tasks] + [layout.shards_dir / "sizes.json"]
    published += [t.manifest_path for t in tasks] + rejects + [layout.funnel_path]
    write_checksums(layout.manifest_dir, layout.shards_dir, published, recipe.shard.processes)
    return funnel
