"""Ingest: every source's rows -> numbered candidate parts under work/ingest/, each input file a
task of the build's engine (on Spark: the executors read the files, the driver sums counts).

A row's identity is (source, row): `row` numbers the rows a source selects (its files in sorted
order, after `where`), and `uid` packs both into one int64 that travels through every stage, so
the final accounting is a join. A row ingest cannot read (a bad byte, JSON line or quote in a
text file; a caption that is not text) still gets its uid and row: it carries `reason` and
`detail` (the line number) and the text stage passes it to rejected/ as it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import polars as pl

from cnclip._common.console import warn
from cnclip.corpus.manifests.schemas import INGEST, SchemaError
from cnclip.corpus.recipe import Recipe, Source
from cnclip.corpus.runtime import storage
from cnclip.corpus.runtime.commit import discard_uncommitted, is_committed, remove_part
from cnclip.corpus.runtime.engine import Engine, default_engine
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


@dataclass(frozen=True)
class FileTask:
    """One input file: its rows first written numbered from 0 (`unnumbered`), then numbered after
    the files before it (`part`, what the text stage reads)."""

    source: Source
    source_index: int
    path: str
    part: Path | str
    unnumbered: Path | str


def _rows_in(part: Path | str) -> int:
    return storage.scan_parquet(part).select(pl.len()).collect().item()


def _unreadable(path: str, err: Exception) -> str:
    """The one line a file that cannot be read is reported with."""
    if isinstance(err, SourceError):
        return str(err)
    return f"{path}: unreadable ({type(err).__name__}: {str(err).splitlines()[0]})"


def read_file(task: FileTask) -> tuple[int | None, str | None]:
    """Runs as a task: one input file -> its rows numbered from 0; returns their count, or the
    line saying why the file cannot be read. A part already numbered, or already read, is kept
    (it exists only whole: renamed into place, or committed)."""
    if is_committed(task.part):
        return _rows_in(task.part), None
    if not is_committed(task.unnumbered):
        try:
            _write_part(task.source, task.source_index, task.path, task.unnumbered, 0)
        except SchemaError:  # the build's bug, not an unreadable file
            raise
        except Exception as err:
            # One bad file is reported and skipped: its rows never entered the build.
            # (polars read errors surface only when the sink runs, hence the broad catch.)
            return None, _unreadable(task.path, err)
    return _rows_in(task.unnumbered), None


def number_file(numbering: tuple[FileTask, int]) -> None:
    """Runs as a task: a file's rows numbered after the `offset` rows of the files before it
    (row + offset, and the uid with it), as the numbered part; the unnumbered one removed."""
    task, offset = numbering
    if not is_committed(task.part):
        rows = storage.scan_parquet(task.unnumbered)
        INGEST.write(rows.with_columns(pl.col("uid") + offset, pl.col("row") + offset), task.part)
    remove_part(task.unnumbered)


def ingest(recipe: Recipe, engine: Engine | None = None) -> dict:
    """Write one numbered part per input file, every file a task of the engine (parts already
    written by an interrupted run are kept): a first pass reads each file into a part numbered
    from 0 and returns its row count; each file's offset is the sum of the counts before it in
    its source; a second pass numbers each part after its offset. Returns rows per source and
    the files that could not be read."""
    layout = BuildLayout.of(recipe)
    engine = engine or default_engine()
    out_dir = layout.ingest_dir
    unnumbered_dir = at(out_dir, "unnumbered")
    storage.make_dirs(unnumbered_dir)
    discard_uncommitted(out_dir)
    discard_uncommitted(unnumbered_dir)
    source_reports: dict[str, dict] = {}
    tasks: list[FileTask] = []
    for source_index, source in enumerate(recipe.sources):
        files, report = prepare_source(source, layout.sample_web_dir, at(layout.work, "crawl"), recipe.crawl, engine,
                                       layout.sources_dir)
        if report is not None:
            source_reports[source.name] = report
        for file_index, path in enumerate(files):
            name = f"{source_index:03d}-{file_index:05d}.parquet"
            tasks.append(FileTask(source, source_index, path, at(out_dir, name), at(unnumbered_dir, name)))
    counts = engine.map_parts(read_file, tasks, "ingest: read files")
    rows_by_source: dict[str, int] = {}
    file_errors: list[str] = []
    numbering: list[tuple[FileTask, int]] = []
    for source_index, source in enumerate(recipe.sources):
        offset, readable, files = 0, 0, 0
        for task, (rows, error) in zip(tasks, counts, strict=True):
            if task.source_index != source_index:
                continue
            files += 1
            if error is not None:
                file_errors.append(error)
                warn(error)
                continue
            numbering.append((task, offset))
            offset += rows
            readable += 1
        if readable == 0:
            raise SourceError(f"source {source.name!r}: none of its {files} file(s) could be read; "
                              f"first error: {file_errors[-1]}")
        rows_by_source[source.name] = offset
    engine.map_parts(number_file, numbering, "ingest: number rows")
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
        return ingest(context.recipe, context.engine)
