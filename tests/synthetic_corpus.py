"""A made-up built corpus for report tests and the report benchmark: samples/ and rejected/
manifests of any size (built by polars expressions, not row loops), a consistent funnel.json,
a few small shards whose images are solid colours (a thumbnail's pixels can be checked), and
optionally the work/download/ files a duplicate's own image is read from."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import polars as pl
from PIL import Image

from cnclip.corpus.manifests.schemas import REJECTED_SCHEMA, SAMPLE_SCHEMA

REASONS = [("text", "text:too_short"), ("text", "text:not_chinese"), ("download", "download:failed_to_download"),
           ("network", "network:timeout"), ("dedup", "dedup:exact_duplicate"), ("dedup", "dedup:near_duplicate")]
SOURCES = ["web", "图片站"]


def colour(uid: int) -> tuple[int, int, int]:
    """The solid colour of a sample's image (distinct for neighbouring uids)."""
    return (uid * 37) % 256, (uid * 91 + 60) % 256, (uid * 53 + 120) % 256


def jpeg(rgb: tuple[int, int, int], size: int = 32) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), rgb).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def _samples(count: int, per_shard: int) -> pl.DataFrame:
    index = pl.int_range(0, count, dtype=pl.Int64)
    frame = pl.select(uid=index * 2).with_columns(
        shard=pl.col("uid") // 2 // per_shard,
        position=pl.col("uid") // 2 % per_shard)
    return frame.select(
        key=_key(pl.col("uid") // 2, per_shard),
        shard="shard", uid="uid",
        source=pl.when(pl.col("uid") % 3 == 0).then(pl.lit(SOURCES[1])).otherwise(pl.lit(SOURCES[0])),
        row=pl.col("uid"), url=pl.lit("http://127.0.0.1/img/") + pl.col("uid").cast(pl.String) + ".jpg",
        caption=pl.lit("一只猫在沙发上睡觉") + pl.col("uid").mod(17).cast(pl.String),
        caption_raw=pl.lit("一隻貓在沙發上睡覺 ") + pl.col("uid").mod(17).cast(pl.String),
        width=pl.lit(32, pl.Int32), height=pl.lit(32, pl.Int32),
        original_width=(200 + pl.col("uid") % 800).cast(pl.Int32),
        original_height=(150 + pl.col("uid") % 600).cast(pl.Int32),
        sha256=pl.col("uid").cast(pl.String), phash=pl.lit("8986d5e6832e6ab6"))


def _key(index: pl.Expr, per_shard: int) -> pl.Expr:
    """The shard stage's key of the index-th sample: 5-digit shard, then its place in the shard."""
    digits = len(str(per_shard - 1))
    return (index // per_shard).cast(pl.String).str.zfill(5) + (index % per_shard).cast(pl.String).str.zfill(digits)


def _rejected(count: int, samples: int, per_shard: int) -> pl.DataFrame:
    reasons = pl.DataFrame({"stage": [s for s, _ in REASONS], "reason": [r for _, r in REASONS],
                            "which": list(range(len(REASONS)))})
    frame = pl.select(uid=pl.int_range(0, count, dtype=pl.Int64) * 2 + 1).with_columns(
        which=(pl.col("uid") // 2 % len(REASONS)).cast(pl.Int64)).join(reasons, on="which", how="left")
    duplicate = pl.col("stage") == "dedup"
    kept_uid = (pl.col("uid") // 2 % samples) * 2
    return frame.select(
        uid="uid", source=pl.when(pl.col("uid") % 3 == 0).then(pl.lit(SOURCES[1])).otherwise(pl.lit(SOURCES[0])),
        row="uid", url=pl.lit("http://127.0.0.1/bad/") + pl.col("uid").cast(pl.String),
        caption_raw=pl.lit("猫 ") + pl.col("uid").cast(pl.String), caption=pl.lit("猫") + pl.col("uid").cast(pl.String),
        stage=pl.when(pl.col("stage") == "network").then(pl.lit("download")).otherwise("stage"), reason="reason",
        detail=pl.when(duplicate).then(pl.lit("pHash distance 3 to the kept image")).otherwise(pl.lit("HTTP 404")),
        duplicate_of=pl.when(duplicate).then(_key(kept_uid // 2, per_shard)).otherwise(None),
        duplicate_of_uid=pl.when(duplicate).then(kept_uid).otherwise(None),
        width=pl.lit(None, pl.Int32), height=pl.lit(None, pl.Int32), original_width=pl.lit(None, pl.Int32),
        original_height=pl.lit(None, pl.Int32), sha256=pl.lit(None, pl.String))


def _funnel(name: str, samples: pl.DataFrame, rejected: pl.DataFrame, shards_dir: Path) -> dict:
    by = rejected.group_by("stage", "reason").len().sort("stage", "reason")
    stages, remaining = [], samples.height + rejected.height
    for stage in ("ingest", "text", "download", "dedup", "shard"):
        mine = {r: n for s, r, n in by.iter_rows() if s == stage}
        out = remaining - sum(mine.values())
        stages.append({"stage": stage, "in": remaining, "out": out, "rejected": mine})
        remaining = out
    by_source = pl.concat([samples.select("source"), rejected.select("source")]).group_by("source").len()
    return {"name": name, "shards_dir": str(shards_dir), "input_rows": samples.height + rejected.height,
            "rows_by_source": dict(by_source.sort("source").iter_rows()), "file_errors": [], "source_reports": {},
            "stages": stages, "samples": samples.height, "rejected": rejected.height,
            "rejected_by_reason": dict(rejected.group_by("reason").len().sort("reason").iter_rows())}


def write_synthetic_corpus(root: Path, samples: int = 2000, rejected: int = 600, per_shard: int = 100,
                           tar_shards: int = 3, parts: int = 4, work: bool = False) -> Path:
    """Write the corpus under `root` (manifests/, out/shards/, and out/work/ when `work`);
    returns the manifest_dir. The keys of the first `tar_shards` shards have images in tars."""
    manifest_dir, shards_dir = root / "manifests", root / "out" / "shards"
    for folder in (manifest_dir / "samples", manifest_dir / "rejected", shards_dir):
        folder.mkdir(parents=True, exist_ok=True)
    kept = _samples(samples, per_shard).select(pl.col(c).cast(t) for c, t in SAMPLE_SCHEMA.items())
    dropped = _rejected(rejected, samples, per_shard).select(pl.col(c).cast(t) for c, t in REJECTED_SCHEMA.items())
    step = -(-kept.height // parts)
    for part in range(parts):
        kept.slice(part * step, step).write_parquet(manifest_dir / "samples" / f"{part:05d}.parquet")
    for stage, frame in dropped.group_by("stage", maintain_order=True):
        frame.write_parquet(manifest_dir / "rejected" / f"{stage[0]}.parquet")
    for shard in range(tar_shards):
        with tarfile.open(shards_dir / f"{shard:05d}.tar", "w") as tar:
            for key, uid in kept.filter(pl.col("shard") == shard).select("key", "uid").iter_rows():
                _add(tar, f"{key}.jpg", jpeg(colour(uid)))
                _add(tar, f"{key}.txt", "一只猫".encode())
    (manifest_dir / "funnel.json").write_text(json.dumps(_funnel("synthetic", kept, dropped, shards_dir),
                                                         ensure_ascii=False), encoding="utf-8")
    if work:
        _write_work(root / "out" / "work", dropped)
    return manifest_dir


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _write_work(work: Path, rejected: pl.DataFrame) -> None:
    """work/download/: attempts.parquet and one tar holding every dedup reject's own image."""
    (work / "download").mkdir(parents=True, exist_ok=True)
    dups = rejected.filter(pl.col("stage") == "dedup").head(200)
    attempts = dups.select("uid", tar=pl.lit("00000.tar"), key=pl.col("uid").cast(pl.String).str.zfill(9))
    attempts.write_parquet(work / "download" / "attempts.parquet")
    with tarfile.open(work / "download" / "00000.tar", "w") as tar:
        for uid, key in attempts.select("uid", "key").iter_rows():
            _add(tar, f"{key}.jpg", jpeg(colour(uid)))
