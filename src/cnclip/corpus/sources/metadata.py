"""Metadata sources: Parquet / CSV / TSV / JSONL files of (url, caption) rows, local or fsspec.

Each file is read by polars in one go (the fast path). A CSV / TSV / JSONL file it cannot read
exactly (a bad byte, line or quote; a JSON caption that may be a stringified object or number)
is read again by the line reader (rows.py): its readable rows are kept, each bad one becomes a
row with `reason` and `detail`, so ingest numbers and accounts for it like any other.
"""

from __future__ import annotations

import glob
import io
from pathlib import Path

import polars as pl

from cnclip._common.errors import CnclipError
from cnclip.corpus.recipe import MetadataSource
from cnclip.corpus.runtime import storage
from cnclip.corpus.sources.rows import CAPTION_NOT_TEXT, HeaderError, read_delimited_lines, read_json_lines

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


class NeedsLineReader(Exception):
    """The fast path cannot read this text file exactly; ingest re-reads it line by line."""


_TEXT_TYPES = (pl.String, pl.Categorical, pl.Enum, pl.Null)
# What polars makes of a JSON number, boolean, object or list in a column of strings.
_STRINGIFIED_JSON = r"(?s)^(?:-?(?:0|[1-9]\d*)(?:\.\d+)?(?:[eE][+-]?\d+)?|true|false|\{.*\}|\[.*\])$"


def expand_paths(path: str) -> list[str]:
    """A path, glob or fsspec URL -> the sorted list of files it names."""
    if storage.is_url(path):
        return storage.list_files(path)  # the same listing the ingest fingerprint records
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


def _readable(path: str) -> str | io.BytesIO:
    """What polars is handed: a local path as it is; a remote file's bytes, fetched through
    fsspec, so it is read with the same driver, endpoint and credentials as it was listed with
    (polars' own object-store client has its own, and would look for cloud credentials itself)."""
    return io.BytesIO(storage.read_bytes(path)) if storage.is_url(path) else path


def scan_file(path: str, fmt: str) -> pl.LazyFrame:
    source = _readable(path)
    if fmt == "parquet":
        return pl.scan_parquet(source)
    if fmt == "jsonl":
        return pl.scan_ndjson(source, infer_schema_length=10_000)
    separator = "\t" if fmt == "tsv" else ","
    # Everything as text: captions like "1984" must not become integers, and a bad number in an
    # unused column must not fail the file.
    options = dict(separator=separator, infer_schema=False, quote_char='"', truncate_ragged_lines=True)
    if path.endswith((".gz", ".zst")):
        return pl.read_csv(source, **options).lazy()
    return pl.scan_csv(source, **options)


def reads_lines(source: object, path: str) -> bool:
    """Whether a file that fails the fast path can be re-read line by line (text formats)."""
    return isinstance(source, MetadataSource) and file_format(path, source.format) != "parquet"


def read_metadata_file(source: MetadataSource, path: str) -> pl.LazyFrame:
    """One file -> lazy frame of url, caption_raw and the kept columns, `where` applied.

    Raises NeedsLineReader for a text file whose schema polars cannot read, or a JSONL file
    whose captions polars may have stringified; other read errors surface when the frame runs."""
    fmt = file_format(path, source.format)
    frame = scan_file(path, fmt)
    try:
        schema = frame.collect_schema()
    except Exception as err:  # polars raises several kinds for unreadable files
        if fmt != "parquet":
            raise NeedsLineReader(path) from err
        raise SourceError(f"{path}: unreadable ({type(err).__name__}: {str(err).splitlines()[0]})") from None
    _check_columns(source, path, schema.names())
    if fmt == "jsonl" and _captions_may_be_stringified(frame, schema, source.caption_column):
        raise NeedsLineReader(path)
    return _select(source, path, _filtered(source, path, frame), schema[source.caption_column])


def read_metadata_lines(source: MetadataSource, path: str) -> pl.LazyFrame:
    """The line reader's view of a text file: the same columns as read_metadata_file, plus
    `reason` and `detail` (null for readable rows), rows in line order."""
    fmt = file_format(path, source.format)
    try:
        if fmt == "jsonl":
            good, bad = read_json_lines(path, source.caption_column, source.url_column)
        else:
            good, bad = read_delimited_lines(path, "\t" if fmt == "tsv" else ",")
    except HeaderError as err:
        raise SourceError(f"{path}: unreadable ({err})") from None
    if fmt == "jsonl" and good.height == 0:  # every line bad, no header: the recipe's columns, null
        wanted = [source.url_column, source.caption_column, *source.keep_columns]
        good = good.with_columns([pl.lit(None, pl.String).alias(c) for c in dict.fromkeys(wanted)])
    _check_columns(source, path, good.columns)
    caption_type = good.schema[source.caption_column]
    rows = _select(source, path, _filtered(source, path, good.lazy()), caption_type, extra=["_line"])
    bad_rows = bad.bad_frame().lazy()
    return (
        pl.concat([rows, bad_rows], how="diagonal_relaxed")
        .sort("_line")
        .drop("_line")
    )


def _check_columns(source: MetadataSource, path: str, columns: list[str]) -> None:
    wanted = {"url_column": source.url_column, "caption_column": source.caption_column}
    wanted.update({f"keep_columns[{c}]": c for c in source.keep_columns})
    for key, column in wanted.items():
        if column not in columns:
            shown = ", ".join(columns[:12])
            raise SourceError(f"{path}: no column {column!r} (source key {key}); columns are: {shown}")


def _captions_may_be_stringified(frame: pl.LazyFrame, schema: pl.Schema, column: str) -> bool:
    """polars types a JSON column of mixed strings and numbers/objects as text (`{"a": 1}`, `5`)
    and one of objects as a struct: only the line reader tells a real string from those."""
    if schema[column] not in (pl.String, pl.Null):
        return True
    return bool(frame.select(pl.col(column).str.contains(_STRINGIFIED_JSON).any()).collect().item())


def _filtered(source: MetadataSource, path: str, frame: pl.LazyFrame) -> pl.LazyFrame:
    if not source.where:
        return frame
    try:
        frame = frame.sql(f"SELECT * FROM self WHERE {source.where}")
        frame.collect_schema()
    except Exception as err:
        raise SourceError(f"{path}: where {source.where!r}: {str(err).splitlines()[0]}") from None
    return frame


def _select(source: MetadataSource, path: str, frame: pl.LazyFrame, caption_type: pl.DataType,
            extra: list[str] = ()) -> pl.LazyFrame:
    """url, caption_raw, the kept columns; a caption column that is not text (numbers, lists,
    structs, bytes) is never stringified: its rows are rejected as ingest:caption_not_text."""
    url = pl.col(source.url_column).cast(pl.String, strict=False).str.strip_chars().alias("url")
    others = [*[pl.col(c) for c in source.keep_columns], *[pl.col(c) for c in extra]]
    if isinstance(caption_type, _TEXT_TYPES):
        return frame.select(url, pl.col(source.caption_column).cast(pl.String).alias("caption_raw"), *others)
    present = pl.col(source.caption_column).is_not_null()
    return frame.select(
        url,
        pl.lit(None, pl.String).alias("caption_raw"),
        *others,
        pl.when(present).then(pl.lit(CAPTION_NOT_TEXT)).alias("reason"),
        pl.when(present).then(pl.lit(f"column {source.caption_column!r} is {caption_type}, not text"))
        .alias("detail"),
    )
