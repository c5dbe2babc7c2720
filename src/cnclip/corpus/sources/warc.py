"""`kind: warc` sources: image/alt pairs from local WARC and WAT files (Common Crawl's layout).

WARC `response` records holding HTML go through the same decoding and extraction as crawled
pages; WAT `metadata` records (JSON) give their `IMG@/src` links with `alt`, resolved against the
page's `<base>` or URL. warcio reads both, plain or gzipped per record, and also writes WARCs
(the tests build theirs with it). Records that cannot be used are counted by reason; a file that
breaks midway keeps the pairs read before the break and is listed in `file_errors`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import BinaryIO, Iterator, Optional

from warcio.archiveiterator import ArchiveIterator

from cnclip.corpus.net.politeness import opted_out
from cnclip.corpus.net.reasons import BAD_RECORD, HTTP_STATUS, NOT_HTML, OPTED_OUT, TOO_LARGE
from cnclip.corpus.recipe.crawl import WarcSource
from cnclip.corpus.sources.decode import decode_page
from cnclip.corpus.sources.extract import LAZY_ATTRIBUTES, caption_of, extract_page, is_html, resolve
from cnclip.corpus.sources.pairs import write_pairs

_OPT_OUT = ("noai", "noimageai")
_WAT_IMAGE_ATTRIBUTES = {"src", *LAZY_ATTRIBUTES}
Row = tuple[str, str, str, str]


@dataclass
class WarcReport:
    files: int = 0
    records: int = 0
    pages: int = 0  # HTML responses and WAT page records read
    pairs: int = 0
    images_without_alt: int = 0
    skipped_records: dict[str, int] = field(default_factory=dict)  # reason -> records not used
    dropped_images: dict[str, int] = field(default_factory=dict)
    file_errors: list[str] = field(default_factory=list)

    def skip(self, reason: str, count: int = 1) -> None:
        self.skipped_records[reason] = self.skipped_records.get(reason, 0) + count

    def drop(self, reason: str, count: int) -> None:
        self.dropped_images[reason] = self.dropped_images.get(reason, 0) + count

    def to_dict(self) -> dict:
        return asdict(self)


def _open(path: str) -> BinaryIO:
    if "://" in path and not path.startswith("file://"):
        import fsspec

        return fsspec.open(path, "rb").open()
    return open(path.removeprefix("file://"), "rb")


def _target(record) -> str:
    return (record.rec_headers.get_header("WARC-Target-URI") or "").strip().strip("<>")


def _response_rows(record, source: WarcSource, report: WarcReport) -> list[Row]:
    """An archived HTTP response -> pairs, when it is a 2xx HTML page within the size limit."""
    page_url = _target(record)
    headers = record.http_headers
    if headers is None or not page_url:
        report.skip(BAD_RECORD)
        return []
    status = headers.get_statuscode()
    if not (status or "").startswith("2"):
        report.skip(HTTP_STATUS)
        return []
    content_type = headers.get_header("Content-Type") or record.rec_headers.get_header(
        "WARC-Identified-Payload-Type") or ""
    if not is_html(content_type):
        report.skip(NOT_HTML)
        return []
    body = record.content_stream().read(source.max_record_bytes + 1)
    if len(body) > source.max_record_bytes:
        report.skip(TOO_LARGE)
        return []
    report.pages += 1
    content = extract_page(decode_page(body, content_type).text, page_url, title_fallback=source.title_fallback)
    report.images_without_alt += content.images_without_alt
    robots = [value for name, value in headers.headers if name.lower() == "x-robots-tag"] + content.robots
    if opted_out(robots, _OPT_OUT, "*") and content.images:
        report.drop(OPTED_OUT, len(content.images))
        return []
    return [(image.url, image.caption, page_url, image.alt_source) for image in content.images]


def _valid_text(text: str) -> str:
    """WAT JSON may hold escaped halves of a character (a caption cut mid-emoji); they cannot be
    written as UTF-8, so they become U+FFFD instead of failing the whole file."""
    return text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")


def _wat_rows(payload: dict, source: WarcSource, report: WarcReport) -> list[Row]:
    """One WAT JSON record -> pairs from its HTML-Metadata links (IMG@/src with alt)."""
    envelope = payload.get("Envelope") or {}
    header = envelope.get("WARC-Header-Metadata") or {}
    response = (envelope.get("Payload-Metadata") or {}).get("HTTP-Response-Metadata") or {}
    html = response.get("HTML-Metadata")
    if header.get("WARC-Type") != "response" or not isinstance(html, dict):
        return []  # request, warcinfo, non-HTML metadata: nothing to read, nothing lost
    page_url = str(header.get("WARC-Target-URI") or "").strip("<>")
    status = str((response.get("Response-Message") or {}).get("Status") or "200")
    if not status.startswith("2"):
        report.skip(HTTP_STATUS)
        return []
    report.pages += 1
    head = html.get("Head") or {}
    base = resolve(page_url, str(head.get("Base"))) if head.get("Base") else None
    base = base or page_url
    http_headers = response.get("Headers") or {}
    robots = [str(v) for k, v in http_headers.items() if k.lower() == "x-robots-tag"]
    robots += [str(m.get("content", "")) for m in head.get("Metas") or []
               if isinstance(m, dict) and str(m.get("name", "")).lower() == "robots"]
    rows: list[Row] = []
    for link in html.get("Links") or []:
        tag, _, attribute = str(link.get("path", "")).partition("@/")
        if tag.upper() != "IMG" or attribute.lower() not in _WAT_IMAGE_ATTRIBUTES:
            continue
        url = resolve(base, str(link.get("url", "")))
        if url is None:
            continue
        caption = caption_of(str(link.get("alt", "")), str(link.get("title", "")), source.title_fallback)
        if caption is None:
            report.images_without_alt += 1
            continue
        rows.append((_valid_text(url), _valid_text(caption[0]), _valid_text(page_url), caption[1]))
    if rows and opted_out(robots, _OPT_OUT, "*"):
        report.drop(OPTED_OUT, len(rows))
        return []
    return rows


def _metadata_rows(record, source: WarcSource, report: WarcReport) -> list[Row]:
    content_type = (record.rec_headers.get_header("Content-Type") or "").lower()
    if "json" not in content_type:
        return []  # WARC metadata records of other kinds (fetch times, languages)
    raw = record.content_stream().read(source.max_record_bytes + 1)
    if len(raw) > source.max_record_bytes:
        report.skip(TOO_LARGE)
        return []
    try:
        payload = json.loads(raw)
    except ValueError:
        report.skip(BAD_RECORD)
        return []
    return _wat_rows(payload, source, report) if isinstance(payload, dict) else []


class TruncatedFile(ValueError):
    """The file ends inside a record (an interrupted download or copy)."""


def _ends_early(record) -> bool:
    """Drain the record and tell whether the file ended before its Content-Length did.

    warcio stops quietly at a truncated gzip member, so without this a cut-off file would look
    complete."""
    stream = record.raw_stream
    while stream.read(1 << 16):
        pass
    return getattr(stream, "limit", 0) > 0


def iter_file_rows(path: str, source: WarcSource, report: WarcReport) -> Iterator[Row]:
    """Pairs from one WARC or WAT file, in record order."""
    report.files += 1
    read = 0
    try:
        with _open(path) as stream:
            records = ArchiveIterator(stream)
            for record in records:
                read += 1
                report.records += 1
                rows: list[Row] = []
                try:
                    if record.rec_type == "response":
                        rows = _response_rows(record, source, report)
                    elif record.rec_type == "metadata":
                        rows = _metadata_rows(record, source, report)
                except Exception:  # noqa: BLE001 - one unreadable record never stops the file
                    report.skip(BAD_RECORD)
                if _ends_early(record):
                    raise TruncatedFile(f"record {read} "
                                        f"({_target(record) or record.rec_type}) is cut off")
                yield from rows
            size = stream.seek(0, 2)
            if records.offset < size:  # a gzip member cut off before its first full record
                raise TruncatedFile(f"the last {size - records.offset} byte(s) hold no complete record")
    except Exception as err:  # noqa: BLE001 - truncated gzip, not a WARC, unreadable file
        first = str(err).splitlines()[0] if str(err) else ""
        report.file_errors.append(f"{path}: unreadable after {read} record(s) "
                                  f"({type(err).__name__}: {first[:200]})")


def extract_warc_file(path: str, source: WarcSource, out_path: str | Path,
                      report: Optional[WarcReport] = None) -> WarcReport:
    """One file -> one pairs Parquet (url, caption_raw, page_url, alt_source)."""
    report = report or WarcReport()
    report.pairs += write_pairs(iter_file_rows(path, source, report), out_path)
    return report
