"""Page decoding for the Chinese web: HTTP charset, then <meta charset>, then detection.

GB2312/GBK labels decode as GB18030 and Big5 as Big5-HKSCS (supersets, as browsers do), since
real "GB2312" pages routinely use GBK-only characters (镕, 堃, 喆). Each declared charset is tried
strictly and skipped when the bytes do not fit it; Latin-1 style HTTP labels, which many Chinese
servers send by default, only count when nothing better is declared or detected.
"""

from __future__ import annotations

import codecs
import re
from dataclasses import dataclass
from typing import Optional

from charset_normalizer import from_bytes

_SUPERSETS = {
    **dict.fromkeys(["gb2312", "gbk", "x-gbk", "cp936", "ms936", "windows-936", "gb_2312-80", "gb_2312",
                     "csgb2312", "chinese", "iso-ir-58", "euc-cn", "euccn", "gb18030", "hz-gb-2312"], "gb18030"),
    **dict.fromkeys(["big5", "big5-hkscs", "big5hkscs", "x-x-big5", "cn-big5", "csbig5", "cp950",
                     "x-mac-trad-chinese"], "big5hkscs"),
}
_WEAK = {"iso-8859-1", "iso8859-1", "latin-1", "latin1", "l1", "windows-1252", "cp1252", "us-ascii", "ascii"}
_HTTP_CHARSET = re.compile(r"charset\s*=\s*[\"']?\s*([\w.:-]+)", re.I)
_META_CHARSET = re.compile(rb"<meta[^>]{0,512}?charset\s*=\s*[\"']?\s*([\w.:-]+)", re.I)
_BOMS = ((codecs.BOM_UTF8, "utf-8-sig"), (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))
_DETECT_BYTES = 256 * 1024  # enough for detection; a whole 5 MB page would cost seconds


@dataclass(frozen=True)
class DecodedPage:
    text: str
    encoding: str  # the Python codec used
    source: str  # bom | http | meta | detected | fallback


def normalize_label(label: Optional[str]) -> Optional[str]:
    """A charset label -> the Python codec to decode with, or None when unknown."""
    if not label:
        return None
    label = label.strip().strip("\"'").lower()
    if label in _SUPERSETS:
        return _SUPERSETS[label]
    try:
        name = codecs.lookup(label).name
    except LookupError:
        return None
    return _SUPERSETS.get(name, name)


def http_charset(content_type: Optional[str]) -> Optional[str]:
    found = _HTTP_CHARSET.search(content_type or "")
    return found.group(1) if found else None


def meta_charset(body: bytes) -> Optional[str]:
    """`<meta charset=…>` or `<meta http-equiv=Content-Type content="…; charset=…">` in the head."""
    found = _META_CHARSET.search(body[:4096])
    return found.group(1).decode("ascii", errors="ignore") if found else None


def detect_charset(body: bytes) -> Optional[str]:
    best = from_bytes(body[:_DETECT_BYTES]).best()
    return best.encoding if best else None


def _try(body: bytes, codec: Optional[str]) -> Optional[str]:
    if not codec:
        return None
    try:
        return body.decode(codec)
    except (UnicodeError, LookupError):  # UnicodeError too: some codecs (e.g. 'undefined') raise it
        return None


def decode_page(body: bytes, content_type: Optional[str] = None) -> DecodedPage:
    """Bytes of an HTML page -> text, by the first charset that decodes them cleanly."""
    for bom, codec in _BOMS:
        if body.startswith(bom):
            text = _try(body, codec)
            if text is not None:
                return DecodedPage(text, codec, "bom")
    declared = normalize_label(http_charset(content_type))
    weak = declared if declared in {normalize_label(w) for w in _WEAK} else None
    candidates = []
    if declared and not weak:
        candidates.append((declared, "http"))
    meta = normalize_label(meta_charset(body))
    if meta and meta.startswith(("utf-16", "utf-32")):
        meta = "utf-8"  # a page that could read its own <meta> is ASCII-compatible (as browsers rule)
    candidates.append((meta, "meta"))
    if body.isascii():
        candidates.append(("ascii", "detected"))
    else:
        candidates.append((lambda: normalize_label(detect_charset(body)), "detected"))
    if weak:
        candidates.append((weak, "http"))
    candidates.append(("utf-8", "fallback"))
    for codec, source in candidates:
        if callable(codec):
            codec = codec()  # detection is the slow step: only when nothing declared fits
        text = _try(body, codec)
        if text is not None:
            return DecodedPage(text, codec, source)
    return DecodedPage(body.decode("utf-8", errors="replace"), "utf-8", "fallback")
