"""The attempts table: img2dataset's per-part results read once, into the one work file the
stages after the download read (schema: manifests/schemas.py, ATTEMPTS).

img2dataset writes, per part, a tar of the images it kept and a Parquet of every row it was
given (key, status, error_message, sizes, sha256). After every download round the stage turns
all of them into work/download/attempts.parquet: one row per attempted input row, its latest
attempt (a --retry-failed round writes parts numbered after the first run's), with the failure
reason decided here once, and the tar and member that hold a success. Both steps go through the
build's engine: each part's rows (reasons decided) as a task, work/download-input/attempts/, then
the latest attempt of each row as one query (on Spark: executors, not the driver).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import polars as pl

from cnclip.corpus.manifests.schemas import ATTEMPT_PARTS, ATTEMPTS, ATTEMPTS_SCHEMA, conform
from cnclip.corpus.runtime import storage
from cnclip.corpus.runtime.commit import is_committed
from cnclip.corpus.runtime.engine import Engine
from cnclip.corpus.runtime.layout import at

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


def attempt_parts_dir(download_dir: Path | str) -> Path | str:
    """Where each part's attempts rows go: `attempts/` in the download's input folder beside
    `download_dir` (work/download-input/ for work/download/), a folder the stage owns."""
    if storage.is_url(download_dir):
        return storage.join(str(download_dir).rstrip("/") + "-input", "attempts")
    folder = Path(download_dir)
    return folder.with_name(folder.name + "-input") / "attempts"


@dataclass(frozen=True)
class AttemptsTask:
    result: Path | str  # img2dataset's result file of one part
    target: Path | str  # its attempts rows


def write_attempt_part(task: AttemptsTask) -> None:
    """Runs as a task: one part's results -> its attempts rows, each failure's reason decided."""
    success = pl.col("status") == "success"
    tar = pl.col("part").cast(pl.String).str.zfill(5) + ".tar"
    table = (
        with_failure_reasons(_results(task.result))
        .with_columns(pl.when(success).then(tar).alias("tar"), pl.when(success).then(pl.col("key")).alias("key"),
                      pl.col("error_message").str.strip_chars().alias("detail"))
        .sort("uid")
        .collect()
    )
    table = conform(table, ATTEMPTS_SCHEMA, {})
    if table["uid"].n_unique() != table.height:  # a round routes each row to one part only
        raise AssertionError(f"{task.result}: a uid attempted twice in its latest round")
    ATTEMPT_PARTS.write(table, task.target)


# Each row's latest attempt: the one in the highest part (a --retry-failed round's parts are
# numbered after every earlier one).
_LATEST = """
SELECT * FROM (SELECT *, ROW_NUMBER() OVER (PARTITION BY uid ORDER BY part DESC) AS attempt_rank FROM parts)
WHERE attempt_rank = 1 ORDER BY uid
"""


def build_attempts(download_dir: Path | str, engine: Engine | None = None, processes: int | None = None) -> None:
    """Every result part -> the attempts table: a task per part, then one engine query (the
    latest attempt of each row) written through the table's schema; nothing on the driver."""
    from cnclip.corpus.runtime.engine import default_engine

    engine = engine or default_engine()
    parts = result_parts(download_dir)
    if not parts:
        ATTEMPTS.write(pl.DataFrame(schema=ATTEMPTS_SCHEMA), attempts_path(download_dir))
        return
    folder = attempt_parts_dir(download_dir)
    storage.make_dirs(folder)
    tasks = [AttemptsTask(part, at(folder, Path(str(part)).name)) for part in parts]
    engine.map_parts(write_attempt_part, tasks, "download: attempts per part", processes)
    latest = engine.sql(_LATEST, parts=engine.scan([task.target for task in tasks]))
    engine.write(engine.sql(f"SELECT {', '.join(ATTEMPTS_SCHEMA)} FROM latest", latest=latest),
                 attempts_path(download_dir), ATTEMPTS)


def write_attempts(download_dir: Path | str, engine: Engine | None = None) -> pl.DataFrame:
    """build_attempts, then the table read back (for callers that want it in memory: tests)."""
    build_attempts(download_dir, engine)
    return scan_attempts(download_dir).collect()


def has_attempts(download_dir: Path | str) -> bool:
    """Whether any row was attempted (a table of 0 rows: nothing was downloaded)."""
    path = attempts_path(download_dir)
    return is_committed(path) and storage.scan_parquet(path).select(pl.len()).collect().item() > 0


def scan_attempts(download_dir: Path | str) -> pl.LazyFrame:
    return storage.scan_parquet(attempts_path(download_dir))
