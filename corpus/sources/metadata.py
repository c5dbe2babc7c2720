"""Metadata sources: Parquet / CSV / TSV / JSONL files of (url, caption) rows, local or fsspec."""

from __future__ import annotations

import glob
from pathlib import Path

import polars as pl

from cnclip.errors import CnclipError

from ..recipe import MetadataSource

_FORMATS_BY_SUFFIX = {
    ".parquet": "parquet",
    ".csv": "csv",
    ".tsv": "tsv",
    ".txt": "tsv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
}


class SourceError(CnclipError, ValueError):
    """One input file that cannot be read as the recipe says; the message names it."""


def expand_paths(path: str) -> list[str]:
    """A path, glob or fsspec URL -> the sorted list of files it names."""
    if "://" in path and not path.startswith("file://"):
        import fsspec

        fs, _, paths = fsspec.core.get_fs_token_paths(path)
        return sorted(fs.unstrip_protocol(p) for p in paths)
    local = path.removeprefix("file://")
    if glob.has_magic(local):
        return sorted(p for p in glob.glob(local, recursive=True) if Path(p).is_file())
    return [local] if Path(local).is_file() else []


def file_format(path: str, declared: str) -> str:
    if declared != "auto":
        return declared
    name = path.lower().removesuffix(".gz").removesuffix(".zst")
    suffix = "." + name.rsplit(".", 1)[-1] if "." in name else ""
    if suffix not in _FORMATS_BY_SUFFIX:
        raise SourceError(f"{path}: cannot tell the format from the extension; set the source's `format`")
    return _FORMATS_BY_SUFFIX[suffix]


def scan_file(path: str, fmt: str) -> pl.LazyFrame:
    if fmt == "parquet":
        return pl.scan_parquet(path)
    if fmt == "jsonl":
        return pl.scan_ndjson(path, infer_schema_length=10_000)
    separator = "\t" if fmt == "tsv" else ","
    # Everything as text: captions like "1984" must not become integers, and a bad number in an
    # unused column must not fail the file.
    options = dict(separator=separator, infer_schema=False, quote_char='"', truncate_ragged_lines=True)
    if path.endswith((".gz", ".zst")):
        return pl.read_csv(path, **options).lazy()
    return pl.scan_csv(path, **options)


def read_metadata_file(source: MetadataSource, path: str) -> pl.LazyFrame:
    """One file -> lazy frame of url, caption_raw and the kept columns, `where` applied."""
    frame = scan_file(path, file_format(path, source.format))
    try:
        columns = frame.collect_schema().names()
    except Exception as err:  # polars raises several kinds for unreadable files
        raise SourceError(f"{path}: unreadable ({type(err).__name__}: {str(err).splitlines()[0]})") from None
    wanted = {"url_column": source.url_column, "caption_column": source.caption_column}
    wanted.update({f"keep_columns[{c}]": c for c in source.keep_columns})
    for key, column in wanted.items():
        if column not in columns:
            shown = ", ".join(columns[:12])
            raise SourceError(f"{path}: no column {column!r} (source key {key}); columns are: {shown}")
    if source.where:
        try:
            frame = frame.sql(f"SELECT * FROM self WHERE {source.where}")
            frame.collect_schema()
        except Exception as err:
            raise SourceError(f"{path}: where {source.where!r}: {str(err).splitlines()[0]}") from None
    return frame.select(
        pl.col(source.url_column).cast(pl.String, strict=False).str.strip_chars().alias("url"),
        pl.col(source.caption_column).cast(pl.String, strict=False).alias("caption_raw"),
        *[pl.col(c) for c in source.keep_columns],
    )
