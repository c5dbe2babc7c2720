"""The line-by-line reader: a CSV / TSV / JSONL file that polars could not read whole.

polars reads a text file in one go and fails it whole for one invalid UTF-8 byte, one malformed
JSON line or one unbalanced quote; and it stringifies a JSON caption that is an object, list or
number when the column's other values are strings. Ingest therefore re-reads only such a file
here, one record at a time: readable records become rows as polars would have made them, each
unreadable one becomes a bad row carrying its reason and line number, so one bad row costs one
row. This path is a Python loop per line, taken only by files that failed the fast path.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from typing import Iterator

import polars as pl

BAD_ROW = "ingest:bad_row"
CAPTION_NOT_TEXT = "ingest:caption_not_text"
# A quoted CSV field may span lines; a record still open after this many lines is a broken quote.
MAX_RECORD_LINES = 16
_DETAIL_CHARS = 200


class HeaderError(ValueError):
    """The file's first line (its column names) cannot be read: no row of it can be."""


@dataclass
class LineRows:
    """Readable records (as text columns, or JSON objects) and the bad ones, by line number."""

    good_lines: list[int] = field(default_factory=list)
    bad_lines: list[int] = field(default_factory=list)
    bad_reasons: list[str] = field(default_factory=list)
    bad_details: list[str] = field(default_factory=list)
    bad_urls: list[str | None] = field(default_factory=list)  # known when only the caption is bad

    def reject(self, line: int, reason: str, detail: str, url: str | None = None) -> None:
        self.bad_lines.append(line)
        self.bad_reasons.append(reason)
        self.bad_details.append(f"line {line}: {detail}"[:_DETAIL_CHARS])
        self.bad_urls.append(url)

    def bad_frame(self) -> pl.DataFrame:
        return pl.DataFrame(
            {"_line": self.bad_lines, "url": self.bad_urls, "reason": self.bad_reasons, "detail": self.bad_details},
            schema={"_line": pl.Int64, "url": pl.String, "reason": pl.String, "detail": pl.String},
        )


def iter_raw_lines(path: str) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, bytes without the line ending), streamed; .gz/.zst decompressed."""
    import fsspec

    with fsspec.open(path, "rb", compression="infer") as handle:
        for number, raw in enumerate(handle, 1):
            yield number, raw.rstrip(b"\r\n")


def _decode(raw: bytes, first: bool) -> str | None:
    try:
        return raw.decode("utf-8-sig" if first else "utf-8")
    except UnicodeDecodeError:
        return None


_OPEN_QUOTE = "unexpected end of data"  # the csv module's words for a quote still open at the end


def _parse_record(text: str, separator: str) -> tuple[list[str] | None, str]:
    """One CSV record's fields (None when unreadable) and, if unreadable, the csv module's reason:
    a quote still open (the record may go on on the next line) or a quote closed mid-field."""
    if '"' not in text and "\r" not in text and "\n" not in text:  # most lines: no quoting to parse
        return (text.split(separator) if text else []), ""
    try:
        rows = list(csv.reader(io.StringIO(text, newline=""), delimiter=separator, quotechar='"', strict=True))
    except csv.Error as err:
        return None, str(err)
    if len(rows) > 1:
        return None, "more than one record"
    return (rows[0] if rows else []), ""


def read_delimited_lines(path: str, separator: str) -> tuple[pl.DataFrame, LineRows]:
    """CSV/TSV -> every readable record as text columns (ragged records padded or truncated, as
    the fast path does) with its `_line`, and the bad records."""
    lines = iter_raw_lines(path)
    try:
        _, first = next(lines)
    except StopIteration:
        raise HeaderError("empty file") from None
    header_text = _decode(first, first=True)
    header = _parse_record(header_text, separator)[0] if header_text is not None else None
    if not header:
        raise HeaderError("the header line is not readable text")
    result = LineRows()
    values: list[list[str | None]] = [[] for _ in header]
    pending: list[tuple[int, bytes]] = []  # a record whose quoted field is still open

    def keep(line: int, fields: list[str]) -> None:
        result.good_lines.append(line)
        for index, column in enumerate(values):
            column.append(fields[index] if index < len(fields) else None)

    def take(line: int, text: str) -> str | None:
        """Keep the record if it parses; else the reason it does not."""
        fields, problem = _parse_record(text, separator)
        if fields is None:
            return problem
        keep(line, fields)
        return None

    def settle(final: bool) -> None:
        """The pending lines hold no whole record: the first is a broken quote, the rest are fed
        again. `final` (end of file, or an unreadable line next) resolves everything pending."""
        nonlocal pending
        while pending:
            result.reject(pending[0][0], BAD_ROW, "unbalanced quote")
            rest, pending = pending[1:], []
            for number, more in rest:
                feed(number, more)
            if not final:
                break

    def feed(number: int, raw: bytes) -> None:
        nonlocal pending
        text = _decode(raw, first=False)
        if text is None:
            settle(final=True)
            result.reject(number, BAD_ROW, "invalid UTF-8")
            return
        if pending:
            pending.append((number, raw))
            problem = take(pending[0][0], "\n".join(r.decode("utf-8") for _, r in pending))
            if problem is None:
                pending = []
            elif problem != _OPEN_QUOTE or len(pending) >= MAX_RECORD_LINES:
                settle(final=False)
            return
        problem = take(number, text)
        if problem == _OPEN_QUOTE:
            pending = [(number, raw)]  # a quoted field may go on on the next lines
        elif problem is not None:
            result.reject(number, BAD_ROW, f"malformed quoted field ({problem})")

    for number, raw in lines:
        feed(number, raw)
    settle(final=True)
    frame = pl.DataFrame({name: column for name, column in zip(_unique(header), values, strict=True)},
                         schema={name: pl.String for name in _unique(header)})
    return frame.with_columns(pl.Series("_line", result.good_lines, dtype=pl.Int64)), result


def _unique(names: list[str]) -> list[str]:
    """Column names as polars makes them unique (`a`, `a_duplicated_0`, ...)."""
    seen: dict[str, int] = {}
    out = []
    for name in names:
        if name in seen:
            out.append(f"{name}_duplicated_{seen[name]}")
            seen[name] += 1
        else:
            seen[name] = 0
            out.append(name)
    return out


def _json_kind(value: object) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    return "a list" if isinstance(value, list) else "an object"


def read_json_lines(path: str, caption_column: str, url_column: str) -> tuple[pl.DataFrame, LineRows]:
    """JSONL -> the readable objects (typed by polars, as the fast path types them) with their
    `_line`, and the bad lines: invalid UTF-8, not JSON, not an object, or a caption that is
    not a string (an object, list, number or boolean is rejected, never stringified)."""
    result = LineRows()
    good: list[bytes] = []
    for number, raw in iter_raw_lines(path):
        if not raw.strip():
            continue  # blank lines are no rows, as in the fast path
        text = _decode(raw, first=number == 1)
        if text is None:
            result.reject(number, BAD_ROW, "invalid UTF-8")
            continue
        try:
            value = json.loads(text)
        except (ValueError, RecursionError) as err:
            result.reject(number, BAD_ROW, f"not valid JSON ({str(err).splitlines()[0]})")
            continue
        if not isinstance(value, dict):
            result.reject(number, BAD_ROW, "not a JSON object")
            continue
        caption = value.get(caption_column)
        if caption is not None and not isinstance(caption, str):
            url = value.get(url_column)
            result.reject(number, CAPTION_NOT_TEXT, f"{caption_column!r} is {_json_kind(caption)}, not a string",
                          url.strip() if isinstance(url, str) else None)
            continue
        result.good_lines.append(number)
        good.append(text.encode("utf-8"))
    frame = _json_frame(good)
    return frame.with_columns(pl.Series("_line", result.good_lines, dtype=pl.Int64)), result


def _json_frame(lines: list[bytes]) -> pl.DataFrame:
    """Objects -> a frame; columns whose values polars cannot unify (a number here, a list there)
    are kept as their JSON text, so the rest of the row survives."""
    if not lines:
        return pl.DataFrame()
    try:
        return pl.read_ndjson(io.BytesIO(b"\n".join(lines)), infer_schema_length=10_000)
    except Exception:  # polars raises several kinds for columns of mixed types
        objects = [json.loads(line) for line in lines]
        names = list(dict.fromkeys(name for obj in objects for name in obj))
        return pl.DataFrame(
            {name: [_as_text(obj.get(name)) for obj in objects] for name in names},
            schema={name: pl.String for name in names},
        )


def _as_text(value: object) -> str | None:
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False)
