"""Source kinds: each turns one recipe source into files of (url, caption_raw, extras) rows.

metadata files are read as they are; the sample web is generated; html sources are crawled and
warc files are scanned into pair files under work/crawl/ first (one per WARC file, so ingest
numbers rows per file as for metadata), then read like metadata. The dataset kinds (coco,
visual_genome, cn_clip and its presets) are read into work/sources/<name>/rows.parquet, their
local and base64 images stored beside it (formats.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import polars as pl

from cnclip.corpus.recipe import MetadataSource, SampleWebSource, Source
from cnclip.corpus.recipe.crawl import CrawlSettings, HtmlSource, WarcSource
from cnclip.corpus.recipe.sources_formats import FORMAT_SOURCES
from cnclip.corpus.sources.metadata import (
    NeedsLineReader,
    SourceError,
    expand_paths,
    read_metadata_file,
    read_metadata_lines,
    reads_lines,
)

if TYPE_CHECKING:
    from cnclip.corpus.runtime.engine import Engine

__all__ = ["NeedsLineReader", "SourceError", "prepare_source", "read_source_file", "read_source_lines", "reads_lines",
           "source_inputs"]

_PAIR_COLUMNS = ["url", "caption_raw", "page_url", "alt_source"]


def source_inputs(source: Source) -> list[str]:
    """What a source reads, cheaply listed (no crawl): the files whose change must redo ingest."""
    if isinstance(source, (MetadataSource, WarcSource)):
        return expand_paths(source.path)
    if isinstance(source, HtmlSource) and source.seeds_file:
        return [source.seeds_file]
    if isinstance(source, FORMAT_SOURCES):
        return _format_inputs(source)
    return []


def _format_inputs(source: Source) -> list[str]:
    """A dataset's annotation files (its images folder is not listed: a listing of every image
    would cost a walk of the dataset on each build)."""
    if source.kind == "coco":
        return [source.annotations]
    if source.kind == "visual_genome":
        return [source.regions, *([source.image_data] if source.image_data else [])]
    from cnclip.corpus.sources.cn_clip import split_files

    return [str(p) for p in split_files(source.path, source.split)]


@dataclass(frozen=True)
class WarcTask:
    """One WARC/WAT file to scan into its pairs file and its report (an engine task)."""

    path: str
    source: WarcSource
    out: str
    report: str


def extract_warc_task(task: WarcTask) -> None:
    from cnclip.corpus.sources.warc import WarcReport, extract_warc_file

    _write_report(Path(task.report), extract_warc_file(task.path, task.source, task.out, WarcReport()).to_dict())


def prepare_source(source: Source, sample_web_dir: Path, crawl_dir: Path, crawl: CrawlSettings,
                   engine: Optional[Engine] = None, sources_dir: Optional[Path] = None
                   ) -> tuple[list[str], dict | None]:
    """The files to read for a source, in the order their rows are numbered, and the report of
    the crawl or scan that made them (None for files read as they are). Outputs that exist are
    whole (written atomically) and reused, so an interrupted ingest does not crawl again. WARC
    files are scanned as the engine's tasks, one per file (on Spark, by the executors): the
    driver only lists them. An html crawl follows links from page to page under one politeness
    budget, so it runs where the build runs, bounded by `crawl.max_pages`. A dataset kind is
    read once into `sources_dir/<name>/` (work/sources/), on the driver."""
    if isinstance(source, FORMAT_SOURCES):
        from cnclip.corpus.sources.formats import prepare_format_source

        return prepare_format_source(source, Path(sources_dir or Path(crawl_dir).parent / "sources"))
    if isinstance(source, SampleWebSource):
        from cnclip.corpus.sources.sample_web import write_sample_web

        return [str(write_sample_web(sample_web_dir / source.name, source.images, source.seed))], None
    if isinstance(source, HtmlSource):
        from cnclip.corpus.sources.html import crawl_html

        out = crawl_dir / f"{source.name}.parquet"
        report_path = out.with_suffix(".report.json")
        if not (out.exists() and report_path.exists()):
            _write_report(report_path, crawl_html(source, crawl, out).to_dict())
        return [str(out)], _read_report(report_path)
    if isinstance(source, WarcSource):
        from cnclip.corpus.runtime.engine import default_engine

        files = expand_paths(source.path)
        if not files:
            raise SourceError(f"source {source.name!r}: path {source.path!r} matches no file")
        tasks = [WarcTask(path, source, str(out), str(out.with_suffix(".report.json")))
                 for path, out in ((p, crawl_dir / f"{source.name}-{i:05d}.parquet") for i, p in enumerate(files))]
        todo = [t for t in tasks if not (Path(t.out).exists() and Path(t.report).exists())]
        if todo:
            Path(crawl_dir).mkdir(parents=True, exist_ok=True)
            (engine or default_engine()).map_parts(extract_warc_task, todo, f"ingest {source.name}: scan WARC files")
        return [t.out for t in tasks], {"files": [_read_report(Path(t.report)) for t in tasks]}
    files = expand_paths(source.path)
    if not files:
        raise SourceError(f"source {source.name!r}: path {source.path!r} matches no file")
    return files, None


def read_source_file(source: Source, path: str) -> pl.LazyFrame:
    if isinstance(source, SampleWebSource):
        base = f"http://127.0.0.1:{source.port}/"
        return pl.scan_parquet(path).select(
            (pl.lit(base) + pl.col("path")).alias("url"), pl.col("caption").alias("caption_raw"), "case"
        )
    if isinstance(source, (HtmlSource, WarcSource)):
        return pl.scan_parquet(path).select(_PAIR_COLUMNS)
    if isinstance(source, FORMAT_SOURCES):
        return pl.scan_parquet(path)
    assert isinstance(source, MetadataSource)
    return read_metadata_file(source, path)


def read_source_lines(source: Source, path: str) -> pl.LazyFrame:
    """A text metadata file that failed the fast path, read one record at a time: readable rows
    plus bad rows (`reason`, `detail` naming the line), in file order."""
    assert isinstance(source, MetadataSource)
    return read_metadata_lines(source, path)


def _write_report(path: Path, report: dict) -> None:
    from cnclip._common.atomic import write_json_atomic

    write_json_atomic(path, report)


def _read_report(path: Path) -> dict:
    import json

    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
