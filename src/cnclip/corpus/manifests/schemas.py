"""The manifests' schemas, declared once: every samples/ part has one schema, every rejected/
part another, so `pl.read_parquet("rejected/*.parquet")`, DuckDB's `read_parquet` and a pyarrow
dataset read a folder in one line.

A column that does not apply to a row (a download reject's `duplicate_of`, another source's
keep_columns) is null. The keep_columns of every source come last, in source order, with the
type polars unifies them to across sources.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

SAMPLE_SCHEMA: dict[str, pl.DataType] = {
    "key": pl.String(), "shard": pl.Int64(), "uid": pl.Int64(), "source": pl.String(), "row": pl.Int64(),
    "url": pl.String(), "caption": pl.String(), "caption_raw": pl.String(),
    "width": pl.Int32(), "height": pl.Int32(), "original_width": pl.Int32(), "original_height": pl.Int32(),
    "sha256": pl.String(), "phash": pl.String(),
}
REJECTED_SCHEMA: dict[str, pl.DataType] = {
    "uid": pl.Int64(), "source": pl.String(), "row": pl.Int64(), "url": pl.String(), "caption_raw": pl.String(),
    "caption": pl.String(), "stage": pl.String(), "reason": pl.String(), "detail": pl.String(),
    "duplicate_of": pl.String(), "duplicate_of_uid": pl.Int64(),
    "width": pl.Int32(), "height": pl.Int32(), "original_width": pl.Int32(), "original_height": pl.Int32(),
    "sha256": pl.String(),
}
# What ingest writes before the source's own columns (ingest.py).
_INGEST_COLUMNS = ("uid", "source", "row", "url", "caption_raw")


def keep_column_types(ingest_dir: Path) -> dict[str, pl.DataType]:
    """Every source's keep_columns and their unified types, read from the ingest parts' footers."""
    parts = sorted(ingest_dir.glob("*.parquet"))
    if not parts:
        return {}
    schema = pl.concat([pl.scan_parquet(p) for p in parts], how="diagonal_relaxed").collect_schema()
    # A column the pipeline itself writes (e.g. a reason or detail set at ingest) is never a keep column.
    return {name: dtype for name, dtype in schema.items()
            if name not in _INGEST_COLUMNS and name not in SAMPLE_SCHEMA and name not in REJECTED_SCHEMA}


def conform(frame: pl.DataFrame, base: dict[str, pl.DataType], extras: dict[str, pl.DataType]) -> pl.DataFrame:
    """`frame` with exactly base + extras columns, in that order and of those types (nulls where absent)."""
    schema = full_schema(base, extras)
    missing = [pl.lit(None, dtype).alias(name) for name, dtype in schema.items() if name not in frame.columns]
    return frame.with_columns(missing).select(pl.col(name).cast(dtype) for name, dtype in schema.items())


def full_schema(base: dict[str, pl.DataType], extras: dict[str, pl.DataType]) -> pl.Schema:
    """base, then the keep_columns (a keep column never shadows a base one: recipe.py forbids it)."""
    return pl.Schema({**base, **{k: v for k, v in extras.items() if k not in base}})


# --- ATTEMPTS: work/download/attempts.parquet, what the download stage made of each row --------
# One row per attempted input row (its latest attempt: a --retry-failed round replaces the
# rows it retried), written by stages/download_attempts.py from img2dataset's per-part results;
# hash, dedup, shard and --retry-failed read only this. `tar` is the img2dataset part holding the
# image, relative to work/download/, and `key` its member's name there (`{key}.{encode_format}`);
# both are null unless status is success. `reason` is null for a success, else a reason code
# (network:*, politeness:*, download:*) and `detail` img2dataset's error message.
ATTEMPTS_SCHEMA: dict[str, pl.DataType] = {
    "uid": pl.Int64(), "part": pl.Int64(), "tar": pl.String(), "key": pl.String(), "status": pl.String(),
    "reason": pl.String(), "detail": pl.String(),
    "width": pl.Int32(), "height": pl.Int32(), "original_width": pl.Int32(), "original_height": pl.Int32(),
    "sha256": pl.String(),
}
