"""Source kinds: each turns one recipe source into lazy frames of (url, caption_raw, extras)."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import polars as pl

from ..recipe import MetadataSource, SampleWebSource, Source
from .metadata import SourceError, expand_paths, read_metadata_file

__all__ = ["SourceError", "source_files", "read_source_file"]


def source_files(source: Source, sample_web_dir: Path) -> list[str]:
    """The files a source reads, in the order their rows are numbered."""
    if isinstance(source, SampleWebSource):
        from ..sample_web import write_sample_web

        return [str(write_sample_web(sample_web_dir / source.name, source.images, source.seed))]
    files = expand_paths(source.path)
    if not files:
        raise SourceError(f"source {source.name!r}: path {source.path!r} matches no file")
    return files


def read_source_file(source: Source, path: str) -> pl.LazyFrame:
    if isinstance(source, SampleWebSource):
        base = f"http://127.0.0.1:{source.port}/"
        return pl.scan_parquet(path).select(
            (pl.lit(base) + pl.col("path")).alias("url"), pl.col("caption").alias("caption_raw"), "case"
        )
    assert isinstance(source, MetadataSource)
    return read_metadata_file(source, path)
