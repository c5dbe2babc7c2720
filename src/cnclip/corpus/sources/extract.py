"""Image/alt-text pairs and links from one HTML page; shared by the `html` and `warc` sources.

The stdlib html.parser is enough here: it is a tolerant tokenizer (no tree, no scripts), which is
all that reading <img>, <a>, <base> and <meta> needs, and it adds no dependency. Image URLs come
from the largest `srcset` candidate, then the lazy-load attributes Chinese sites use
(`data-original`, `data-src`, `data-actualsrc`, Discuz's `zoomfile`/`file`…), then `src`, all
resolved against the document base (`<base href>` when present, as browsers do for the whole
page).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from html.parser import HTMLParser
from typing import Optional
from urllib.parse import urldefrag, urljoin

from cnclip.corpus.net.uri import to_uri

# Lazy-load conventions, in preference order; srcset-like ones hold candidate lists.
SRCSET_ATTRIBUTES = ("data-srcset", "data-lazy-srcset", "srcset")
LAZY_ATTRIBUTES = ("data-original", "data-src", "data-lazy-src", "data-lazy", "data-actualsrc",
                   "data-url", "data-echo", "data-original-src", "zoomfile", "file")
_SKIP_SCHEMES = ("data:", "javascript:", "blob:", "about:", "mailto:")
_HTML_TYPES = ("text/html", "application/xhtml+xml")
_SPACE = re.compile(r"\s+")
_DESCRIPTOR = re.compile(r"^(\d+(?:\.\d+)?)([wxh])$", re.I)


@dataclass(frozen=True)
class FoundImage:
    url: str
    caption: str
    alt_source: str  # "alt" or "title"


@dataclass
class PageContent:
    images: list[FoundImage] = field(default_factory=list)
    links: list[str] = field(default_factory=list)
    robots: list[str] = field(default_factory=list)  # <meta name=robots|our token> contents
    images_without_alt: int = 0
    base_url: str = ""


def is_html(content_type: Optional[str]) -> bool:
    return (content_type or "").split(";")[0].strip().lower() in _HTML_TYPES


def clean_text(value: Optional[str]) -> str:
    return _SPACE.sub(" ", value or "").strip()


def caption_of(alt: str, title: str, title_fallback: bool) -> Optional[tuple[str, str]]:
    """(caption, "alt"|"title") for an image, or None when it has no usable text."""
    alt, title = clean_text(alt), clean_text(title)
    if alt:
        return alt, "alt"
    if title_fallback and title:
        return title, "title"
    return None


def largest_srcset_candidate(srcset: str) -> Optional[str]:
    """The URL with the largest width (or density) descriptor; URLs may contain commas."""
    best: Optional[tuple[float, float, str]] = None
    position, text = 0, srcset.strip()
    while position < len(text):
        while position < len(text) and (text[position].isspace() or text[position] == ","):
            position += 1
        start = position
        while position < len(text) and not text[position].isspace():
            position += 1
        url = text[start:position]
        descriptors = ""
        if url.endswith(","):
            url = url.rstrip(",")
        else:
            end = text.find(",", position)
            end = len(text) if end == -1 else end
            descriptors, position = text[position:end].strip(), end + 1
        if not url:
            continue
        width, density = 0.0, 1.0
        for descriptor in descriptors.split():
            found = _DESCRIPTOR.match(descriptor)
            if found and found.group(2).lower() == "w":
                width = float(found.group(1))
            elif found and found.group(2).lower() == "x":
                density = float(found.group(1))
        if best is None or (width, density) > best[:2]:
            best = (width, density, url)
    return best[2] if best else None


def image_source(attrs: dict[str, str]) -> Optional[str]:
    """The raw (unresolved) URL an <img> really shows, lazy loading and srcset included."""
    for name in SRCSET_ATTRIBUTES:
        value = attrs.get(name, "").strip()
        if value and not value.startswith(_SKIP_SCHEMES):
            candidate = largest_srcset_candidate(value)
            if candidate:
                return candidate
    for name in (*LAZY_ATTRIBUTES, "src"):
        value = attrs.get(name, "").strip()
        if value and not value.lower().startswith(_SKIP_SCHEMES):
            return value
    return None


def resolve(base: str, raw: str) -> Optional[str]:
    """An absolute http(s) URI without fragment (non-ASCII escaped), or None for anything else."""
    try:
        absolute, _ = urldefrag(urljoin(base, raw.strip()))
        if not absolute.lower().startswith(("http://", "https://")):
            return None
        return to_uri(absolute)
    except ValueError:
        return None


class _PageParser(HTMLParser):
    def __init__(self, robots_names: tuple[str, ...]):
        super().__init__(convert_charrefs=True)
        self.robots_names = robots_names
        self.base: Optional[str] = None
        self.images: list[tuple[str, str, str]] = []  # (raw url, alt, title)
        self.links: list[str] = []
        self.robots: list[str] = []

    def handle_starttag(self, tag: str, attr_list: list[tuple[str, Optional[str]]]) -> None:
        attrs = {name.lower(): value or "" for name, value in attr_list}
        if tag == "img":
            raw = image_source(attrs)
            if raw:
                self.images.append((raw, attrs.get("alt", ""), attrs.get("title", "")))
        elif tag in ("a", "area") and attrs.get("href"):
            self.links.append(attrs["href"])
        elif tag == "base" and self.base is None and attrs.get("href"):
            self.base = attrs["href"]  # the first <base href> sets the document base
        elif tag == "meta" and attrs.get("name", "").strip().lower() in self.robots_names:
            self.robots.append(attrs.get("content", ""))


def extract_page(html: str, page_url: str, *, title_fallback: bool = False,
                 robots_names: tuple[str, ...] = ("robots",)) -> PageContent:
    """Images with their alt text (or title), followed-link candidates and meta robots values."""
    parser = _PageParser(tuple(n.lower() for n in robots_names))
    # Text after the last '>' holds no complete tag, and Python's parser (before 3.11.13,
    # CVE-2025-6069) can take hours over a long tail of '<' without '>': drop it.
    html = html[: html.rfind(">") + 1]
    try:
        parser.feed(html)
        parser.close()
    except Exception:  # noqa: BLE001 - html.parser rarely raises; keep what was read so far
        pass
    base = resolve(page_url, parser.base) if parser.base else None
    base = base or page_url
    content = PageContent(robots=parser.robots, base_url=base)
    for raw, alt, title in parser.images:
        url = resolve(base, raw)
        if url is None:
            continue
        caption = caption_of(alt, title, title_fallback)
        if caption:
            content.images.append(FoundImage(url, *caption))
        else:
            content.images_without_alt += 1
    seen: set[str] = set()
    for raw in parser.links:
        url = resolve(base, raw)
        if url and url not in seen:
            seen.add(url)
            content.links.append(url)
    return content
