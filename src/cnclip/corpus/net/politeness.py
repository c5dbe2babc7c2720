"""Politeness: robots.txt per host, per-host concurrency and spacing, and page opt-outs.

Shared by the crawler and the download workers (one HostPolicy per worker, net/policy.py), so
that 10k images from one host arrive spaced out rather than as a burst.
"""

from __future__ import annotations

import contextlib
import re
import threading
import time
from dataclasses import dataclass
from typing import Callable, Collection, Iterable, Iterator, Optional, Protocol
from urllib.parse import urlsplit

from protego import Protego

from cnclip.corpus.net.reasons import HOST_BUSY, RATE_LIMITED

DEFAULT_USER_AGENT = "cnclip/0.1 (Chinese image-text corpus crawler)"
_TOKEN_RE = re.compile(r"[A-Za-z0-9_-]+")
# X-Robots-Tag directives written `name: value`, which are not user-agent prefixes.
_VALUED_DIRECTIVES = {"unavailable_after", "max-snippet", "max-image-preview", "max-video-preview"}


def robots_token(user_agent: str) -> str:
    """The product token robots.txt groups are matched against (`cnclip` of `cnclip/0.1 (...)`).

    Matching the whole string would let a group named after any word in the comment apply.
    """
    found = _TOKEN_RE.match(user_agent.strip())
    return found.group(0).lower() if found else user_agent.strip().lower()


class HostBusy(RuntimeError):
    """No request slot for a host freed within the allowed wait."""

    reason = HOST_BUSY


@dataclass
class _HostState:
    active: int = 0
    next_start: float = 0.0
    min_delay: Optional[float] = None  # a host's own delay (robots.txt Crawl-delay), if larger


class HostLimiter:
    """At most `concurrency` requests in flight per host, request starts `min_delay` s apart."""

    def __init__(self, concurrency: int = 2, min_delay: float = 0.0, clock: Callable[[], float] = time.monotonic):
        if concurrency < 1:
            raise ValueError("per-host concurrency must be at least 1")
        self.concurrency = concurrency
        self.min_delay = max(0.0, min_delay)
        self._clock = clock
        self._hosts: dict[str, _HostState] = {}
        self._prune_at = 50_000
        self._cond = threading.Condition()

    def set_host_delay(self, host: str, seconds: float) -> None:
        """Raise one host's spacing (a Crawl-delay); never below the configured minimum."""
        with self._cond:
            state = self._hosts.setdefault(host.lower(), _HostState())
            state.min_delay = max(self.min_delay, seconds)

    def _delay(self, state: Optional[_HostState]) -> float:
        return state.min_delay if state is not None and state.min_delay is not None else self.min_delay

    @contextlib.contextmanager
    def slot(self, host: str, wait_timeout: Optional[float] = None) -> Iterator[None]:
        """Hold one of the host's slots for the duration of a request; HostBusy after the wait."""
        key = host.lower()
        give_up = None if wait_timeout is None else self._clock() + wait_timeout
        with self._cond:
            while True:
                state = self._hosts.setdefault(key, _HostState())
                now = self._clock()
                if state.active < self.concurrency and now >= state.next_start:
                    state.active += 1
                    state.next_start = now + self._delay(state)
                    break
                wait = state.next_start - now if state.active < self.concurrency else None
                if give_up is not None:
                    left = give_up - now
                    if left <= 0:
                        raise HostBusy(f"{host}: no request slot within {wait_timeout:g} s "
                                       f"(per-host concurrency {self.concurrency}, delay {self._delay(state):g} s)")
                    wait = left if wait is None else min(wait, left)
                self._cond.wait(wait)
        try:
            yield
        finally:
            with self._cond:
                state.active -= 1
                self._prune_locked()
                self._cond.notify_all()

    def _prune_locked(self) -> None:
        # A download touches millions of hosts; forget idle ones whose spacing has elapsed (rarely:
        # the scan is linear in the number of hosts).
        if len(self._hosts) < self._prune_at:
            return
        now = self._clock()
        idle = [k for k, s in self._hosts.items() if s.active == 0 and s.next_start <= now and s.min_delay is None]
        for key in idle:
            del self._hosts[key]
        self._prune_at = max(50_000, 2 * len(self._hosts))


class _Answer(Protocol):
    status: Optional[int]
    body: bytes
    reason: Optional[str]
    detail: str


@dataclass(frozen=True)
class RobotsVerdict:
    allowed: bool
    crawl_delay: Optional[float] = None
    detail: str = ""


class RobotsCache:
    """robots.txt per (scheme, host, port), fetched once and read with protego.

    RFC 9309: a 4xx robots.txt (429 aside) means no rules; a 5xx, a 429 or no answer at all means
    the whole site is off limits for now.
    """

    def __init__(self, fetch: Callable[[str], _Answer], user_agent: str):
        self._fetch = fetch
        self.token = robots_token(user_agent)
        self._rules: dict[str, tuple[Optional[Protego], str]] = {}
        self._pending: dict[str, threading.Event] = {}
        self._lock = threading.Lock()

    def verdict(self, url: str) -> RobotsVerdict:
        parts = urlsplit(url)
        key = f"{parts.scheme.lower()}://{parts.netloc.lower()}"
        rules, why = self._rules_for(key)
        if rules is None:
            allowed = why == ""
            return RobotsVerdict(allowed, None, "" if allowed else f"{url}: {why}")
        if not rules.can_fetch(url, self.token):
            return RobotsVerdict(False, None, f"{url}: disallowed by {key}/robots.txt for {self.token!r}")
        return RobotsVerdict(True, rules.crawl_delay(self.token))

    def _rules_for(self, key: str) -> tuple[Optional[Protego], str]:
        while True:
            with self._lock:
                if key in self._rules:
                    return self._rules[key]
                waiting = self._pending.get(key)
                if waiting is None:
                    self._pending[key] = threading.Event()
                    break
            waiting.wait()  # another thread is fetching this host's robots.txt
        entry: tuple[Optional[Protego], str] = (None, "robots.txt could not be read")
        try:
            entry = self._load(key)
        finally:
            with self._lock:
                self._rules[key] = entry
                self._pending.pop(key).set()
        return entry

    def _load(self, key: str) -> tuple[Optional[Protego], str]:
        try:
            answer = self._fetch(key + "/robots.txt")
            status = answer.status
            if answer.reason is None and status is not None and 200 <= status < 300:
                return Protego.parse(answer.body.decode("utf-8", errors="replace")), ""
        except Exception as err:  # a broken robots.txt must not stop the crawl of other hosts
            return None, f"robots.txt unreadable, site treated as disallowed ({type(err).__name__}: {err})"
        if status is not None and 400 <= status < 500 and status != 429:
            return None, ""  # no robots.txt: no rules
        why = answer.detail or f"HTTP {status}"
        if answer.reason == RATE_LIMITED or status == 429:
            why = f"robots.txt answered 429 ({why})"
        return None, f"robots.txt unavailable, site treated as disallowed ({why})"


def opted_out(values: Iterable[str], directives: Collection[str], token: str) -> Optional[str]:
    """The first disallowed directive in X-Robots-Tag / meta robots values that applies to us.

    A value is `noai, noimageai` (everyone) or `cnclip: noai` (one user agent), as img2dataset
    reads it for images.
    """
    wanted = {d.strip().lower() for d in directives}
    for value in values:
        head, colon, tail = value.partition(":")
        agent = head.strip().lower()
        listed = value
        if colon and _TOKEN_RE.fullmatch(agent) and agent not in _VALUED_DIRECTIVES:
            if agent != token:
                continue  # addressed to another crawler
            listed = tail
        for directive in listed.split(","):
            if directive.strip().lower() in wanted:
                return directive.strip().lower()
    return None
