"""What the corpus report shows, computed by polars lazy scans over the manifests: counts per
source and reason, histogram bins, the sampled rows whose images and examples it shows. Every
function returns small values (tens of rows), however large the corpus is."""

from __future__ import annotations

from pathlib import Path

import polars as pl

THUMBNAILS = 48
EXAMPLES_PER_REASON = 4
# Reasons whose rows name a kept row with the same or a near-identical image: shown side by side.
DUPLICATE_REASONS = ("dedup:exact_duplicate", "dedup:near_duplicate", "dedup:text_duplicate", "dedup:eval_overlap")


def scan(manifest_dir: Path, folder: str) -> pl.LazyFrame | None:
    """Every column of one manifest folder, lazily (None when it holds no part)."""
    parts = sorted((Path(manifest_dir) / folder).glob("*.parquet"))
    if not parts:
        return None
    return pl.scan_parquet(parts)  # one schema per folder (manifests/README.md)


def clip_scores(manifest_dir: Path, samples: pl.LazyFrame | None) -> pl.LazyFrame | None:
    """A frame with a `clip_score` column: the samples' own, else the published embeddings'."""
    if samples is not None and "clip_score" in samples.collect_schema():
        return samples.select("clip_score")
    embeddings = scan(manifest_dir, "embeddings")
    if embeddings is not None and "clip_score" in embeddings.collect_schema():
        return embeddings.select("clip_score")
    return None


def counts_by(frame: pl.LazyFrame | None, *keys: str) -> pl.DataFrame:
    if frame is None:
        return pl.DataFrame({key: [] for key in keys} | {"rows": []})
    return frame.group_by(*keys).agg(pl.len().alias("rows")).sort(*keys).collect()


def histogram(frame: pl.LazyFrame, expr: pl.Expr, bins: int = 30,
              integer: bool = False) -> tuple[list[float], list[int]] | None:
    """(edges, counts) of `expr` over `frame` in at most `bins` equal bins, by two aggregations
    (range, then counts per bin index); None when no row has a value. Integer values get whole
    bins centred on the integers (no empty bins between neighbouring values)."""
    value = expr.cast(pl.Float64).alias("v")
    lo, hi = frame.select(value.min().alias("lo"), value.max().alias("hi")).collect().row(0)
    if lo is None or hi is None:
        return None
    if integer:
        width = float(max(1, -(-int(hi - lo + 1) // bins)))
        lo -= 0.5
        bins = int(-(-(hi + 0.5 - lo) // width))
    else:
        hi = hi if hi > lo else lo + 1.0
        width = (hi - lo) / bins
    index = ((pl.col("v") - lo) / width).floor().clip(0, bins - 1).cast(pl.Int32).alias("bin")
    per_bin = (frame.select(value).drop_nulls().filter(pl.col("v").is_not_nan())
               .select(index).group_by("bin").agg(pl.len()).collect())
    counts = [0] * bins
    for b, n in per_bin.iter_rows():  # at most `bins` rows
        counts[b] = n
    return [lo + i * width for i in range(bins + 1)], counts


def source_table(funnel: dict, samples: pl.LazyFrame | None, rejected: pl.LazyFrame | None) -> list[tuple]:
    """Per source: input rows (funnel.json), samples, rejected, and its three commonest reasons."""
    kept = dict(counts_by(samples.select("source") if samples is not None else None, "source").iter_rows())
    reasons = counts_by(rejected.select("source", "reason") if rejected is not None else None, "source", "reason")
    sources = sorted(set(funnel.get("rows_by_source", {})) | set(kept) | set(reasons["source"].to_list()),
                     key=str)
    rows = []
    for source in sources:
        mine = reasons.filter(pl.col("source") == source).sort("rows", "reason", descending=[True, False])
        top = ", ".join(f"{reason} {n:,}" for reason, n in mine.select("reason", "rows").head(3).iter_rows())
        rows.append((source, funnel.get("rows_by_source", {}).get(source), kept.get(source, 0),
                     int(mine["rows"].sum()), top))
    return rows


def thumbnail_rows(samples: pl.LazyFrame | None, shards: list[int], limit: int = THUMBNAILS) -> pl.DataFrame:
    """Up to `limit` samples spread evenly over the shards that are on disk (key, shard, caption)."""
    if samples is None or not shards:
        return pl.DataFrame({"key": [], "caption": []}, schema={"key": pl.String, "caption": pl.String})
    present = samples.select("key", "shard", "caption", "width", "height").filter(pl.col("shard").is_in(shards))
    total = present.select(pl.len()).collect().item()
    step = max(1, total // limit)
    return present.gather_every(step).head(limit).collect()


def examples(rejected: pl.LazyFrame | None, per_reason: int = EXAMPLES_PER_REASON) -> pl.DataFrame:
    """The first `per_reason` rows (by uid) of every reject reason present."""
    columns = ["uid", "stage", "reason", "source", "url", "caption_raw", "caption", "detail", "duplicate_of",
               "duplicate_of_uid"]
    if rejected is None:
        return pl.DataFrame(schema={c: pl.String for c in columns})
    return (rejected.select(columns)
            .filter(pl.col("uid").rank("ordinal").over("reason") <= per_reason)
            .sort("reason", "uid").collect())


def attempts_of(work_dir: Path | None, uids: list[int]) -> pl.DataFrame | None:
    """(uid, tar, key) of these rows' downloaded images in work/download/, None when work/ is gone."""
    path = Path(work_dir) / "download" / "attempts.parquet" if work_dir else None
    if path is None or not path.is_file():
        return None
    return pl.scan_parquet(path).filter(pl.col("uid").is_in(uids)).select("uid", "tar", "key").collect()
