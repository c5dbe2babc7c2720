"""The attempts table: img2dataset's per-part results read once, into the one work file the
stages after the download read (schema: manifests/schemas.py, ATTEMPTS).

img2dataset writes, per part, a tar of the images it kept and a Parquet of every row it was
given (key, status, error_message, sizes, sha256). After every download round the stage turns
all of them into work/download/attempts.parquet: one row per attempted input row, its latest
attempt (a --retry-failed round writes parts numbered after the first run's), with the failure
reason decided here once, and the tar and member that hold a success.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from cnclip.corpus.manifests.schemas import ATTEMPTS, ATTEMPTS_SCHEMA, conform
from cnclip.corpus.runtime import storage
from cnclip.corpus.runtime.commit import is_committed

_RESULT_COLUMNS = {"uid": pl.Int64, "key": pl.String, "status": pl.String, "error_message": pl.String,
                   "width": pl.Int32, "height": pl.Int32, "original_width": pl.Int32, "original_height": pl.Int32,
                   "sha256": pl.String}


def attempts_path(download_dir: Path | str) -> Path | str:
    return storage.join(download_dir, "attempts.parquet") if storage.is_url(download_dir) else (
        Path(download_dir) / "attempts.parquet")


def result_parts(download_dir: Path | str) -> list[Path | str]:
    """img2dataset's per-part result files (`00000.parquet`...), by part number (local paths, or
    the URLs of a URL work_dir)."""
    found = storage.list_files(download_dir) if storage.is_url(download_dir) else Path(download_dir).glob("*.parquet")
    parts = [p for p in found if Path(p).suffix == ".parquet" and Path(p).stem.isdigit()]
    return sorted(parts, key=lambda p: int(Path(p).stem))


def with_failure_reasons(attempts: pl.LazyFrame) -> pl.LazyFrame:
    """Each failed row's reason: the guard's or a transient network reason when its message names
    one (network:blocked_address, network:timeout, network:rate_limited...), else img2dataset's
    status as `download:<status>`; null for a success."""
    from cnclip.corpus.net.reasons import reason_of_message

    failed = pl.coalesce(reason_of_message(pl.col("error_message")), pl.lit("download:") + pl.col("status"))
    return attempts.with_columns(
        pl.when(pl.col("status") == "success").then(pl.lit(None, pl.String)).otherwise(failed).alias("reason"))


def _results(part: Path | str) -> pl.LazyFrame:
    return storage.scan_parquet(part).select(pl.col(n).cast(t) for n, t in _RESULT_COLUMNS.items()).with_columns(
        pl.lit(int(Path(part).stem), pl.Int64).alias("part"))


def write_attempts(download_dir: Path | str) -> pl.DataFrame:
    """Every result part -> the attempts table (written atomically, checked against its schema)."""
    parts = result_parts(download_dir)
    if not parts:
        table = pl.DataFrame(schema=ATTEMPTS_SCHEMA)
    else:
        latest = pl.concat([_results(p) for p in parts]).sort("part", "uid").unique("uid", keep="last")
        success = pl.col("status") == "success"
        tar = pl.col("part").cast(pl.String).str.zfill(5) + ".tar"
        table = (
            with_failure_reasons(latest)
            .with_columns(pl.when(success).then(tar).alias("tar"), pl.when(success).then(pl.col("key")).alias("key"),
                          pl.col("error_message").str.strip_chars().alias("detail"))
            .sort("uid")
            .collect()
        )
        table = conform(table, ATTEMPTS_SCHEMA, {})
    if table["uid"].n_unique() != table.height:
        raise AssertionError(f"{attempts_path(download_dir)}: a uid attempted twice in its latest round")
    ATTEMPTS.write(table, attempts_path(download_dir))
    return table


def has_attempts(download_dir: Path | str) -> bool:
    """Whether any row was attempted (a table of 0 rows: nothing was downloaded)."""
    path = attempts_path(download_dir)
    return is_committed(path) and storage.scan_parquet(path).select(pl.len()).collect().item() > 0


def scan_attempts(download_dir: Path | str) -> pl.LazyFrame:
    return storage.scan_parquet(attempts_path(download_dir))
