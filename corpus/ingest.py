"""Ingest: every source's rows -> numbered candidate parts under work/ingest/.

A row's identity is (source, row): `row` numbers the rows a source selects (its files in sorted
order, after `where`), and `uid` packs both into one int64 that travels through every stage, so
the final accounting is a join.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import polars as pl

from .layout import BuildLayout, replace_dir, write_json_atomic
from .progress import stage_progress, warn
from .recipe import Recipe
from .sources import SourceError, read_source_file, source_files

ROW_BITS = 40  # up to 10^12 rows per source, 2^23 sources in an int64


def make_uid(source_index: int, row: pl.Expr) -> pl.Expr:
    return (pl.lit(source_index, pl.Int64) * (1 << ROW_BITS) + row.cast(pl.Int64)).alias("uid")


@dataclass
class IngestReport:
    parts: list[Path]
    rows_by_source: dict[str, int]
    file_errors: list[str]


def ingest(recipe: Recipe) -> IngestReport:
    layout = BuildLayout.of(recipe)
    out_dir = replace_dir(layout.ingest_dir)
    parts: list[Path] = []
    rows_by_source: dict[str, int] = {}
    file_errors: list[str] = []
    for source_index, source in enumerate(recipe.sources):
        files = source_files(source, layout.sample_web_dir)
        offset = 0
        readable = 0
        with stage_progress(f"ingest {source.name}", total=len(files)) as advance:
            for file_index, path in enumerate(files):
                part = out_dir / f"{source_index:03d}-{file_index:05d}.parquet"
                try:
                    frame = read_source_file(source, path)
                    numbered = frame.with_row_index("row", offset=offset).select(
                        make_uid(source_index, pl.col("row")),
                        pl.lit(source.name).alias("source"),
                        pl.col("row").cast(pl.Int64),
                        pl.all().exclude("row"),
                    )
                    numbered.sink_parquet(part)
                except Exception as err:
                    # One bad file is reported and skipped: its rows never entered the build.
                    # (polars read errors surface only when the sink runs, hence the broad catch.)
                    part.unlink(missing_ok=True)
                    message = str(err) if isinstance(err, SourceError) else (
                        f"{path}: unreadable ({type(err).__name__}: {str(err).splitlines()[0]})")
                    file_errors.append(message)
                    warn(message)
                    advance()
                    continue
                count = pl.scan_parquet(part).select(pl.len()).collect().item()
                offset += count
                readable += 1
                parts.append(part)
                advance()
        if readable == 0:
            raise SourceError(f"source {source.name!r}: none of its {len(files)} file(s) could be read; "
                              f"first error: {file_errors[-1]}")
        rows_by_source[source.name] = offset
    write_json_atomic(layout.ingest_report, {"rows_by_source": rows_by_source, "file_errors": file_errors})
    return IngestReport(parts, rows_by_source, file_errors)
