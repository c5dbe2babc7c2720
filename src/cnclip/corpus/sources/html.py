"""`kind: html` sources: crawl from seed URLs, same-host links, up to max_depth and max_pages.

Every fetch goes through the network guard (each redirect hop included) and the politeness rules:
robots.txt (Crawl-delay honoured), per-host concurrency and spacing, X-Robots-Tag / meta robots
opt-outs. Pages that are refused or fail are counted in the report by reason, never dropped
silently; one bad page never stops the crawl.
"""

from __future__ import annotations

import collections
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional
from urllib.parse import urldefrag, urlsplit

from cnclip.corpus.net.fetch import GuardedFetcher
from cnclip.corpus.net.guard import NetworkGuard
from cnclip.corpus.net.politeness import HostLimiter, RobotsCache, opted_out, robots_token
from cnclip.corpus.net.reasons import (
    CRAWL_DELAY_TOO_LONG,
    NOT_HTML,
    OPTED_OUT,
    PAGE_ERROR,
    ROBOTS_DISALLOWED,
    TOO_LARGE,
)
from cnclip.corpus.net.uri import to_uri
from cnclip.corpus.recipe.crawl import CrawlSettings, HtmlSource, is_web_url
from cnclip.corpus.sources.decode import decode_page
from cnclip.corpus.sources.extract import extract_page, is_html
from cnclip.corpus.sources.metadata import SourceError
from cnclip.corpus.sources.pairs import write_pairs

_MAX_FAILURE_LINES = 200


@dataclass
class CrawlReport:
    """What a crawl did: pages by outcome, pairs written, and why anything was left out."""

    pages_visited: int = 0
    pages_fetched: int = 0
    pairs: int = 0
    images_without_alt: int = 0
    refused_pages: dict[str, int] = field(default_factory=dict)  # reason -> pages not used
    dropped_images: dict[str, int] = field(default_factory=dict)  # reason -> images not kept
    failures: list[str] = field(default_factory=list)  # one line each: "reason: detail" (first 200)
    seed_errors: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class _PageOutcome:
    final_url: str = ""
    rows: list[tuple[str, str, str, str]] = field(default_factory=list)
    links: list[str] = field(default_factory=list)
    reason: Optional[str] = None
    detail: str = ""
    fetched: bool = False
    images_without_alt: int = 0
    dropped_images: collections.Counter = field(default_factory=collections.Counter)


def site_of(url: str) -> str:
    """The host links must stay on: lower-case, without a leading `www.`."""
    host = (urlsplit(url).hostname or "").lower()
    return host[4:] if host.startswith("www.") else host


def read_seeds(source: HtmlSource) -> tuple[list[str], list[str]]:
    """The source's seed URLs (list, then file), deduplicated in order, and the bad lines."""
    candidates, errors = [(url, "seeds") for url in source.seeds], []
    if source.seeds_file:
        try:
            lines = Path(source.seeds_file).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as err:
            raise SourceError(
                f"source {source.name!r}: seeds_file {source.seeds_file}: cannot read ({err})") from None
        candidates += [(line.strip(), f"{source.seeds_file}:{number}") for number, line in enumerate(lines, 1)
                       if line.strip() and not line.strip().startswith("#")]
    seeds: list[str] = []
    for url, where in candidates:
        try:
            # The form extracted links take, so a seed linked back to is recognised as seen.
            normalized = urldefrag(to_uri(url))[0] if is_web_url(url) else None
        except ValueError:
            normalized = None
        if normalized is None:
            errors.append(f"{where}: not an http(s) URL: {url[:120]!r}")
        elif normalized not in seeds:
            seeds.append(normalized)
    return seeds, errors


def _content_decoded(body: bytes, encoding: str, max_bytes: int) -> tuple[bytes, Optional[str]]:
    """The page bytes of a body a server compressed although asked for identity, decompressed no
    further than the size limit; or a refusal reason (unknown or corrupt encoding, too large)."""
    import zlib

    encoding = encoding.strip().lower()
    if encoding in ("", "identity"):
        return body, None
    if encoding not in ("gzip", "x-gzip", "deflate"):
        return b"", NOT_HTML
    try:
        page = zlib.decompressobj(16 + zlib.MAX_WBITS if "gzip" in encoding else zlib.MAX_WBITS).decompress(
            body, max_bytes + 1)
    except zlib.error:
        return b"", NOT_HTML
    return (b"", TOO_LARGE) if len(page) > max_bytes else (page, None)


class HtmlCrawler:
    """One html source's crawl: breadth-first by depth, pages of a level fetched in parallel."""

    def __init__(self, source: HtmlSource, settings: CrawlSettings, guard: Optional[NetworkGuard] = None):
        self.source = source
        self.settings = settings
        self.guard = guard or NetworkGuard(settings.allow_networks)
        self.limiter = HostLimiter(settings.per_host_concurrency, settings.per_host_delay)
        self.fetcher = GuardedFetcher(self.guard, settings.user_agent, settings.timeout,
                                      settings.max_response_bytes, settings.max_redirects, self.limiter)
        self.token = robots_token(settings.user_agent)
        needs_robots = settings.obey_robots or settings.obey_robots_for_images
        self.robots = RobotsCache(self.fetcher.get, settings.user_agent) if needs_robots else None

    def run(self, seeds: list[str], report: CrawlReport) -> list[tuple[str, str, str, str]]:
        rows: list[tuple[str, str, str, str]] = []
        seen = set(seeds)
        level = [(url, site_of(url)) for url in seeds]
        budget, depth = self.source.max_pages, 0
        with ThreadPoolExecutor(self.settings.workers, thread_name_prefix=f"crawl-{self.source.name}") as pool:
            while level and budget > 0:
                batch = level[:budget]
                budget -= len(batch)
                next_level = []
                # map() keeps the batch's order, so row order does not depend on thread timing.
                for (url, site), outcome in zip(batch, pool.map(self._visit, [u for u, _ in batch]), strict=True):
                    self._account(url, outcome, report)
                    rows.extend(outcome.rows)
                    seen.add(outcome.final_url)
                    if depth >= self.source.max_depth:
                        continue
                    for link in outcome.links:
                        if link not in seen and site_of(link) == site:
                            seen.add(link)
                            next_level.append((link, site))
                level, depth = next_level, depth + 1
        return rows

    def _account(self, url: str, outcome: _PageOutcome, report: CrawlReport) -> None:
        report.pages_visited += 1
        report.pages_fetched += outcome.fetched
        report.images_without_alt += outcome.images_without_alt
        for reason, count in outcome.dropped_images.items():
            report.dropped_images[reason] = report.dropped_images.get(reason, 0) + count
        if outcome.reason:
            report.refused_pages[outcome.reason] = report.refused_pages.get(outcome.reason, 0) + 1
            if len(report.failures) < _MAX_FAILURE_LINES:
                report.failures.append(f"{outcome.reason}: {outcome.detail or url}")

    def _robots_refusal(self, url: str) -> Optional[tuple[str, str]]:
        if self.robots is None or not self.settings.obey_robots:
            return None
        verdict = self.robots.verdict(url)
        if not verdict.allowed:
            return ROBOTS_DISALLOWED, verdict.detail
        if verdict.crawl_delay:
            if verdict.crawl_delay > self.settings.max_crawl_delay:
                return CRAWL_DELAY_TOO_LONG, (f"{url}: robots.txt Crawl-delay {verdict.crawl_delay:g} s is over "
                                              f"crawl.max_crawl_delay ({self.settings.max_crawl_delay:g} s)")
            self.limiter.set_host_delay(urlsplit(url).hostname or "", verdict.crawl_delay)
        return None

    def _visit(self, url: str) -> _PageOutcome:
        try:
            return self._visit_unguarded(url)
        except Exception as err:  # noqa: BLE001 - one bad page never stops the crawl
            return _PageOutcome(final_url=url, reason=PAGE_ERROR, detail=f"{url}: {type(err).__name__}: {err}")

    def _visit_unguarded(self, url: str) -> _PageOutcome:
        answer = self.fetcher.get(url, hop_check=self._robots_refusal)
        outcome = _PageOutcome(final_url=answer.url, fetched=answer.status is not None)
        if answer.reason:
            outcome.reason, outcome.detail = answer.reason, answer.detail
            return outcome
        content_type = answer.headers.get("Content-Type", "")
        if content_type and not is_html(content_type):  # no Content-Type at all: try it as HTML
            outcome.reason, outcome.detail = NOT_HTML, f"{answer.url}: Content-Type {content_type[:80]}"
            return outcome
        encoding = answer.headers.get("Content-Encoding", "")
        body, refusal = _content_decoded(answer.body, encoding, self.settings.max_response_bytes)
        if refusal:
            outcome.reason, outcome.detail = refusal, f"{answer.url}: Content-Encoding {encoding[:40]!r}"
            return outcome
        page = decode_page(body, content_type)
        content = extract_page(page.text, answer.url, title_fallback=self.source.title_fallback,
                               robots_names=("robots", self.token))
        outcome.images_without_alt = content.images_without_alt
        directives = [*(answer.headers.get_all("X-Robots-Tag") or []), *content.robots]
        if not opted_out(directives, ("nofollow", "none"), self.token):
            outcome.links = content.links
        opt_out = opted_out(directives, self.settings.page_opt_out_directives, self.token)
        if opt_out:
            outcome.reason, outcome.detail = OPTED_OUT, f"{answer.url}: robots directive {opt_out!r}"
            if content.images:
                outcome.dropped_images[OPTED_OUT] += len(content.images)
            return outcome
        for image in content.images:
            if self.settings.obey_robots_for_images and self.robots is not None:
                verdict = self.robots.verdict(image.url)
                if not verdict.allowed:
                    outcome.dropped_images[ROBOTS_DISALLOWED] += 1
                    continue
            outcome.rows.append((image.url, image.caption, answer.url, image.alt_source))
        return outcome


def crawl_html(source: HtmlSource, settings: CrawlSettings, out_path: str | Path, *,
               guard: Optional[NetworkGuard] = None) -> CrawlReport:
    """Crawl one html source and write its pairs (url, caption_raw, page_url, alt_source)."""
    report = CrawlReport()
    seeds, report.seed_errors = read_seeds(source)
    if not seeds:
        raise SourceError(f"source {source.name!r}: no usable seed URL"
                          + (f" ({report.seed_errors[0]})" if report.seed_errors else ""))
    rows = HtmlCrawler(source, settings, guard).run(seeds, report)
    report.pairs = write_pairs(rows, out_path)
    return report


__all__ = ["CrawlReport", "HtmlCrawler", "crawl_html", "read_seeds", "site_of"]
