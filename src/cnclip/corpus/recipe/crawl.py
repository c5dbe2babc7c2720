"""Recipe schema for the crawl source kinds (`html`, `warc`) and the guard/politeness settings.

Kept apart from recipe.py so recipe.py can import these into its Source union and settings
without an import cycle.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal, Optional
from urllib.parse import urlsplit

from pydantic import AfterValidator, Field, field_validator, model_validator

from cnclip._common.strict import StrictModel
from cnclip.corpus.net.guard import parse_networks
from cnclip.corpus.net.politeness import DEFAULT_USER_AGENT

MiB = 1024 * 1024

# A source name becomes file names under work/ (crawl pairs, the sample web): a word, no path.
_SOURCE_NAME = re.compile(r"[^\W_][\w.\-]{0,63}")


def _source_name(value: str) -> str:
    if not _SOURCE_NAME.fullmatch(value) or ".." in value:
        raise ValueError(f"{value[:40]!r} is not a safe source name: 1-64 letters, digits, '_', '-' or '.', "
                         "starting with a letter or digit, no '..' or path separators")
    return value


def _header_text(value: str) -> str:
    """A User-Agent goes into every request's headers: a CR/LF would split them (header
    injection) and non-ASCII is not sent as the user wrote it."""
    for char in value:
        if not " " <= char <= "~":
            what = "a control character" if ord(char) < 0x20 or 0x7F <= ord(char) < 0xA0 else "a non-ASCII character"
            raise ValueError(f"has {what} (U+{ord(char):04X}); only printable ASCII is sent in HTTP headers")
    return value


SourceName = Annotated[str, AfterValidator(_source_name)]
UserAgentText = Annotated[str, AfterValidator(_header_text)]


class GuardSettings(StrictModel):
    """Network guard and per-host politeness, shared by `crawl:` and `download:`.

    Meant as a base of DownloadSettings (`class DownloadSettings(GuardSettings)`), which gives the
    `download.allow_networks` etc. keys; CrawlSettings below changes some defaults for pages.
    """

    allow_networks: list[str] = Field(
        default_factory=list, description="CIDRs exempt from the guard, e.g. [127.0.0.0/8] for a local test site")
    max_response_bytes: int = Field(default=20 * MiB, ge=1)
    per_host_concurrency: int = Field(default=4, ge=1, le=1024)
    per_host_delay: float = Field(default=0.1, ge=0.0, description="seconds between request starts to one host")
    per_host_max_wait: float = Field(
        default=60.0, gt=0.0, description="longest a request waits for its host's turn (then network:host_busy)")
    user_agent: UserAgentText = Field(default=DEFAULT_USER_AGENT, min_length=1)
    obey_robots_for_images: bool = False
    max_crawl_delay: float = Field(
        default=30.0, ge=0.0, description="a robots.txt Crawl-delay above this skips the host instead")

    @field_validator("allow_networks")
    @classmethod
    def _cidrs(cls, value: list[str]) -> list[str]:
        parse_networks(value)  # raises a ValueError naming the bad entry
        return value


class CrawlSettings(GuardSettings):
    """The recipe's `crawl:` section: how `html` sources fetch pages."""

    max_response_bytes: int = Field(default=5 * MiB, ge=1)
    per_host_concurrency: int = Field(default=2, ge=1, le=1024)
    per_host_delay: float = Field(default=1.0, ge=0.0)
    timeout: float = Field(default=15.0, gt=0.0, description="seconds per request, whole response included")
    max_redirects: int = Field(default=5, ge=0)
    obey_robots: bool = True
    workers: int = Field(default=4, ge=1, le=1024, description="pages fetched at once, all hosts together")
    page_opt_out_directives: list[str] = Field(
        default_factory=lambda: ["noai", "noimageai"],
        description="X-Robots-Tag / meta robots values that drop a page's images")


def is_web_url(url: str) -> bool:
    try:
        parts = urlsplit(url)
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.hostname)


class HtmlSource(StrictModel):
    """Pages crawled from seed URLs, following same-host links; yields (img url, alt) pairs."""

    name: SourceName
    kind: Literal["html"]
    seeds: list[str] = Field(default_factory=list)
    seeds_file: Optional[str] = Field(default=None, description="a UTF-8 file of seed URLs, one a line, # comments")
    max_depth: int = Field(default=1, ge=0, description="link hops from a seed; 0 fetches the seeds only")
    max_pages: int = Field(default=100, ge=1)
    title_fallback: bool = Field(default=False, description="use an image's title when it has no alt text")

    @field_validator("seeds")
    @classmethod
    def _web_urls(cls, value: list[str]) -> list[str]:
        bad = [u for u in value if not is_web_url(u)]
        if bad:
            raise ValueError(f"not http(s) URLs: {', '.join(repr(u) for u in bad[:3])}")
        return value

    @model_validator(mode="after")
    def _some_seeds(self) -> "HtmlSource":
        if not self.seeds and not self.seeds_file:
            raise ValueError("give `seeds` or `seeds_file`")
        return self


class WarcSource(StrictModel):
    """Local WARC / WAT files (plain or .gz, Common Crawl's layout included)."""

    name: SourceName
    kind: Literal["warc"]
    path: str = Field(description="a file or a glob, e.g. crawl/*.warc.gz")
    title_fallback: bool = False
    max_record_bytes: int = Field(default=5 * MiB, ge=1, description="larger HTML records are skipped and counted")
