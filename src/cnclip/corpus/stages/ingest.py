"""Ingest: every source's rows -> numbered candidate parts under work/ingest/.

A row's identity is (source, row): `row` numbers the rows a source selects (its files in sorted
order, after `where`), and `uid` packs both into one int64 that travels through every stage, so
the final accounting is a join. A row ingest cannot read (a bad byte, JSON line or quote in a
text file; a caption that is not text) still gets its uid and row: it carries `reason` and
`detail` (the line number) and the text stage passes it to rejected/ as it is.
"""

from __future__ import annotations

import polars as pl

from cnclip._common.console import stage_progress, warn
from cnclip.corpus.manifests.schemas import INGEST, SchemaError
from cnclip.corpus.recipe import Recipe
from cnclip.corpus.runtime import storage
from cnclip.corpus.runtime.commit import discard_uncommitted, is_committed
from cnclip.corpus.runtime.fingerprints import input_listing
from cnclip.corpus.runtime.layout import BuildLayout, at
from cnclip.corpus.runtime.stage import Stage, StageContext
from cnclip.corpus.sources import (
    SourceError,
    prepare_source,
    read_source_file,
    read_source_lines,
    reads_lines,
    source_inputs,
)

ROW_BITS = 40  # up to 10^12 rows per source, 2^23 sources in an int64


def make_uid(source_index: int, row: pl.Expr) -> pl.Expr:
    return (pl.lit(source_index, pl.Int64) * (1 << ROW_BITS) + row.cast(pl.Int64)).alias("uid")


def _numbered(rows: pl.LazyFrame, source_index: int, name: str, offset: int) -> pl.LazyFrame:
    return rows.with_row_index("row", offset=offset).select(
        make_uid(source_index, pl.col("row")),
        pl.lit(name).alias("source"),
        pl.col("row").cast(pl.Int64),
        pl.all().exclude("row"),
    )


def _write_part(source, source_index: int, path: str, part, offset: int) -> None:
    """One file's numbered rows -> its part: by polars in one go, or, for a text file polars
    cannot read whole, line by line (its bad rows kept as rows with a reason)."""
    try:
        INGEST.write(_numbered(read_source_file(source, path), source_index, source.name, offset), part)
    except (SourceError, SchemaError):
        raise
    except Exception:  # polars raises several kinds, some only when the sink runs
        if not reads_lines(source, path):
            raise
        INGEST.write(_numbered(read_source_lines(source, path), source_index, source.name, offset), part)


def ingest(recipe: Recipe) -> dict:
    """Write one numbered part per input file (parts already written by an interrupted run are
    kept); returns rows per source and the files that could not be read."""
    layout = BuildLayout.of(recipe)
    out_dir = layout.ingest_dir
    storage.make_dirs(out_dir)
    discard_uncommitted(out_dir)
    rows_by_source: dict[str, int] = {}
    file_errors: list[str] = []
    source_reports: dict[str, dict] = {}
    for source_index, source in enumerate(recipe.sources):
        files, report = prepare_source(source, layout.sample_web_dir, at(layout.work, "crawl"), recipe.crawl)
        if report is not None:
            source_reports[source.name] = report
        offset = 0
        readable = 0
        with stage_progress(f"ingest {source.name}", total=len(files)) as advance:
            for file_index, path in enumerate(files):
                part = at(out_dir, f"{source_index:03d}-{file_index:05d}.parquet")
                # A part that exists is whole (renamed into place, or committed): resume after it.
                if not is_committed(part):
                    try:
                        _write_part(source, source_index, path, part, offset)
                    except SchemaError:  # the build's bug, not an unreadable file
                        raise
                    except Exception as err:
                        # One bad file is reported and skipped: its rows never entered the build.
                        # (polars read errors surface only when the sink runs, hence the broad catch.)
                        message = str(err) if isinstance(err, SourceError) else (
                            f"{path}: unreadable ({type(err).__name__}: {str(err).splitlines()[0]})")
                        file_errors.append(message)
                        warn(message)
                        advance()
                        continue
                offset += storage.scan_parquet(part).select(pl.len()).collect().item()
                readable += 1
                advance()
        if readable == 0:
            raise SourceError(f"source {source.name!r}: none of its {len(files)} file(s) could be read; "
                              f"first error: {file_errors[-1]}")
        rows_by_source[source.name] = offset
    return {"rows_by_source": rows_by_source, "file_errors": file_errors, "source_reports": source_reports}


class IngestStage(Stage):
    """Sources -> numbered candidate parts; covers the sources, crawl settings and input files."""

    name = "ingest"
    sections = ("sources", "crawl")

    def extra(self, recipe: Recipe) -> list:
        return [[input_listing(source_inputs(s)) for s in recipe.sources]]

    def outputs(self, layout: BuildLayout) -> tuple:
        return (layout.ingest_dir, at(layout.work, "crawl"))

    def run(self, context: StageContext) -> dict:
        return ingest(context.recipe)
