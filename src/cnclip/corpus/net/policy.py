"""What every guarded download request goes through, whichever client carries it: the guard's
settings, the per-host limiter and robots.txt cache of one worker, the refusal status lines, and
the count of outcomes.

A download worker holds one `HostPolicy` for all its threads (net/opener.py); the rows of one
host are routed to a fixed set of workers (stages/download_lanes.py) and each of those gets its
share of the host's concurrency and spacing (`lanes_per_host`), so the recipe's per-host limits
hold across processes without any shared state.
"""

from __future__ import annotations

import collections
import threading
from dataclasses import dataclass, replace
from typing import Optional, Sequence
from urllib.parse import urlsplit

from cnclip.corpus.net.fetch import GuardedFetcher
from cnclip.corpus.net.guard import NetworkGuard
from cnclip.corpus.net.local_files import resolve_roots
from cnclip.corpus.net.politeness import DEFAULT_USER_AGENT, HostLimiter, RobotsCache
from cnclip.corpus.net.reasons import (
    BAD_RESPONSE,
    BAD_URL,
    BLOCKED_ADDRESS,
    CONNECT_FAILED,
    CRAWL_DELAY_TOO_LONG,
    DNS_FAILED,
    HOST_BUSY,
    LOCAL_FILE_NOT_ALLOWED,
    LOCAL_FILE_UNREADABLE,
    MARKER,
    NOT_REGULAR_FILE,
    ROBOTS_DISALLOWED,
    TIMEOUT,
    TOO_LARGE,
    TRUNCATED,
    UNSUPPORTED_SCHEME,
)
from cnclip.corpus.recipe.crawl import GuardSettings

STATUS_FOR = {BAD_URL: 400, UNSUPPORTED_SCHEME: 400, BLOCKED_ADDRESS: 403, ROBOTS_DISALLOWED: 403,
              DNS_FAILED: 502, CONNECT_FAILED: 502, TOO_LARGE: 502, HOST_BUSY: 503, TIMEOUT: 504,
              TRUNCATED: 502, BAD_RESPONSE: 502, LOCAL_FILE_NOT_ALLOWED: 403, NOT_REGULAR_FILE: 403,
              LOCAL_FILE_UNREADABLE: 404}
_ROBOTS_MAX_BYTES = 512 * 1024  # RFC 9309 asks crawlers to read at least 500 KiB


def refusal_phrase(reason: str, subject: str) -> str:
    """The status line's phrase of a refusal, `cnclip-guard network:blocked_address 127.0.0.2`:
    img2dataset records only the error message, and reason_from_error_message reads it back."""
    phrase = f"{MARKER} {reason} {subject}".replace("\r", " ").replace("\n", " ")[:200]
    return phrase.encode("ascii", "backslashreplace").decode("ascii")  # a status line is Latin-1


@dataclass(frozen=True)
class GuardConfig:
    allow_networks: Sequence[str] = ()
    max_response_bytes: int = 20 * 1024 * 1024
    request_timeout: float = 10.0  # per upstream request, everything included
    per_host_concurrency: int = 4
    per_host_delay: float = 0.1
    per_host_max_wait: float = 60.0
    obey_robots_for_images: bool = False
    user_agent: str = DEFAULT_USER_AGENT
    max_crawl_delay: float = 30.0
    allow_local_files: Sequence[str] = ()  # folders file:// URLs may read from (none: every one refused)
    lanes_per_host: int = 1  # workers a host's rows are spread over; each gets 1/n of its limits

    @classmethod
    def from_settings(cls, settings: GuardSettings, request_timeout: float) -> "GuardConfig":
        return cls(tuple(settings.allow_networks), settings.max_response_bytes, float(request_timeout),
                   settings.per_host_concurrency, settings.per_host_delay, settings.per_host_max_wait,
                   settings.obey_robots_for_images, settings.user_agent, settings.max_crawl_delay,
                   allow_local_files=tuple(getattr(settings, "allow_local_files", ())))

    def spread(self, lanes: int) -> "GuardConfig":
        return replace(self, lanes_per_host=max(1, lanes))

    @property
    def client_timeout(self) -> float:
        """The timeout to give the client (img2dataset): a queued request must not time out
        in the client while it waits for its host's turn."""
        return self.request_timeout + self.per_host_max_wait + 5.0

    @property
    def lane_concurrency(self) -> int:
        return max(1, self.per_host_concurrency // self.lanes_per_host)

    @property
    def lane_delay(self) -> float:
        return self.per_host_delay * self.lanes_per_host


class HostPolicy:
    """The guard, per-host limiter and robots cache one worker's threads share, and its counts."""

    def __init__(self, config: GuardConfig, guard: Optional[NetworkGuard] = None):
        self.config = config
        self.guard = guard or NetworkGuard(config.allow_networks)
        self.local_roots = resolve_roots(config.allow_local_files)
        self.limiter = HostLimiter(config.lane_concurrency, config.lane_delay)
        self._counts: collections.Counter = collections.Counter()
        self._count_lock = threading.Lock()
        self._robots: Optional[RobotsCache] = None
        if config.obey_robots_for_images:
            fetcher = GuardedFetcher(self.guard, config.user_agent, config.request_timeout, _ROBOTS_MAX_BYTES)
            self._robots = RobotsCache(lambda url: fetcher.get(url, polite=False), config.user_agent)

    def count(self, outcome: str) -> None:
        with self._count_lock:
            self._counts[outcome] += 1

    def stats(self) -> dict[str, int]:
        """Requests by outcome: `ok`, `redirect` (answered, the client asks again) or a reason code
        (`network:blocked_address`, `network:rate_limited` for a 429…)."""
        with self._count_lock:
            return dict(self._counts)

    def robots_refusal(self, url: str) -> Optional[tuple[str, str]]:
        """(reason, detail) when robots.txt disallows the image URL or asks for a Crawl-delay over
        max_crawl_delay (if robots is obeyed for images), else None. An uncapped delay would turn
        every row of that host into host_busy, which --retry-failed would retry forever."""
        if self._robots is None:
            return None
        verdict = self._robots.verdict(url)
        if verdict.crawl_delay and verdict.crawl_delay > self.config.max_crawl_delay:
            return CRAWL_DELAY_TOO_LONG, (f"{url}: robots.txt Crawl-delay {verdict.crawl_delay:g} s is over "
                                          f"max_crawl_delay ({self.config.max_crawl_delay:g} s)")
        if verdict.crawl_delay:  # this worker's share of the host's spacing, as for per_host_delay
            self.limiter.set_host_delay(urlsplit(url).hostname or "", verdict.crawl_delay * self.config.lanes_per_host)
        return None if verdict.allowed else (ROBOTS_DISALLOWED, verdict.detail)
