"""Guarded HTTP fetching: one request, connected only to an address the network guard checked.

Used by the crawler (pages, robots.txt) and by the download workers' guarded opener (images). Each request
has a hard deadline (a watchdog shuts the socket when it passes, so a server dripping one byte at
a time cannot hold a worker) and a maximum body size; redirects are followed by `GuardedFetcher`
one hop at a time, each hop checked again before any connection is made.
"""

from __future__ import annotations

import heapq
import http.client
import itertools
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field
from email.message import Message
from typing import Callable, Optional
from urllib.parse import urljoin, urlsplit

from cnclip.corpus.net.guard import Decision, NetworkGuard
from cnclip.corpus.net.politeness import HostBusy, HostLimiter
from cnclip.corpus.net.reasons import (
    BAD_RESPONSE,
    BAD_URL,
    CONNECT_FAILED,
    TIMEOUT,
    TLS_FAILED,
    TOO_LARGE,
    TOO_MANY_REDIRECTS,
    TRUNCATED,
    reason_for_status,
)
from cnclip.corpus.net.uri import to_uri

_CHUNK = 64 * 1024
# http.client already stops at one header line over 64 KiB and at 100 headers; this caps them all
# together, so an answer cannot hand a worker megabytes of headers.
MAX_HEADER_BYTES = 64 * 1024
_REDIRECTS = {301, 302, 303, 307, 308}


class _Watchdog:
    """One thread that shuts sockets down when their deadline passes (any number of requests)."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, socket.socket]] = []
        self._live: set[int] = set()
        self._ids = itertools.count()
        self._cond = threading.Condition()
        self._thread: Optional[threading.Thread] = None

    def watch(self, sock: socket.socket, deadline: float) -> int:
        with self._cond:
            ident = next(self._ids)
            self._live.add(ident)
            heapq.heappush(self._heap, (deadline, ident, sock))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="fetch-watchdog", daemon=True)
                self._thread.start()
            self._cond.notify()
            return ident

    def cancel(self, ident: int) -> None:
        with self._cond:
            self._live.discard(ident)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._heap:
                    self._cond.wait()
                deadline, ident, sock = self._heap[0]
                wait = deadline - time.monotonic()
                if wait > 0:
                    self._cond.wait(wait)
                    continue
                heapq.heappop(self._heap)
                if ident not in self._live:
                    continue  # the request finished in time
                self._live.discard(ident)
            try:
                sock.shutdown(socket.SHUT_RDWR)  # wakes a blocked recv in the request's thread
            except OSError:
                pass


WATCHDOG = _Watchdog()


@dataclass
class Response:
    """What one request gave: a status and body, or a failure `reason` (a guard/network code)."""

    url: str
    status: Optional[int] = None
    reason_phrase: str = ""
    headers: Message = field(default_factory=Message)
    body: bytes = b""
    reason: Optional[str] = None
    detail: str = ""
    redirects: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.reason is None and self.status is not None and 200 <= self.status < 300


def fetch_once(guard: NetworkGuard, decision: Decision, url: str, *, timeout: float, max_bytes: int,
               headers: Optional[dict[str, str]] = None, method: str = "GET") -> Response:
    """One request to an already-checked host; the body is read up to `max_bytes` + 1."""
    try:
        parts = urlsplit(to_uri(url))
    except ValueError as err:  # a host IDNA cannot encode
        return Response(url, reason=BAD_URL, detail=f"{url[:200]}: {err}")
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    deadline = time.monotonic() + timeout
    conn_class = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    conn = conn_class(decision.host, decision.port, timeout=timeout)
    watch: list[int] = []

    def create_connection(*_args, **_kwargs) -> socket.socket:
        # http.client's own hook: connect to the checked address; TLS still verifies the name.
        sock = guard.connect(decision, timeout)
        watch.append(WATCHDOG.watch(sock, deadline))
        return sock

    conn._create_connection = create_connection  # type: ignore[attr-defined]
    try:
        conn.request(method, path, headers=dict(headers or {}))
        # The socket the answer arrives on (TLS-wrapped for https); http.client lets go of it
        # once the answer says `Connection: close`, so keep it here.
        sock = conn.sock
        if parts.scheme == "https":
            watch.append(WATCHDOG.watch(sock, deadline))  # the wrapped socket replaced the raw one
        answer = conn.getresponse()
        header_bytes = sum(len(name) + len(value) + 4 for name, value in answer.msg.items())
        if header_bytes > MAX_HEADER_BYTES:
            return Response(url, reason=BAD_RESPONSE,
                            detail=f"{url}: {header_bytes} bytes of headers (limit {MAX_HEADER_BYTES})")
        length = answer.getheader("Content-Length")
        if length and length.isdigit() and int(length) > max_bytes:
            return Response(url, answer.status, answer.reason, answer.msg, reason=TOO_LARGE,
                            detail=f"{url}: Content-Length {length} is over the {max_bytes}-byte limit")
        chunks, size = [], 0
        while method != "HEAD":
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            sock.settimeout(remaining)
            chunk = answer.read1(_CHUNK)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
            if size > max_bytes:
                return Response(url, answer.status, answer.reason, answer.msg, reason=TOO_LARGE,
                                detail=f"{url}: body over the {max_bytes}-byte limit")
        if time.monotonic() >= deadline:
            raise TimeoutError  # the watchdog's shutdown reads as an end of body
        if method != "HEAD" and answer.length:  # http.client counts down what Content-Length promised
            return Response(url, reason=TRUNCATED,
                            detail=f"{url}: connection closed {answer.length} bytes short of Content-Length {length}")
        return Response(url, answer.status, answer.reason, answer.msg, b"".join(chunks))
    except (ConnectionError, OSError, http.client.HTTPException) as err:
        if time.monotonic() >= deadline or isinstance(err, (TimeoutError, socket.timeout)):
            return Response(url, reason=TIMEOUT, detail=f"{url}: no complete answer within {timeout:g} s")
        message = str(err) or type(err).__name__
        reason = _failure_reason(err)
        return Response(url, reason=reason, detail=f"{url}: {message.removeprefix(CONNECT_FAILED + ': ')}")
    finally:
        for ident in watch:
            WATCHDOG.cancel(ident)
        conn.close()


def _failure_reason(err: BaseException) -> str:
    """A failed request's reason: a broken answer is permanent (the server will send it again),
    a dropped connection or a body cut short is transient."""
    if isinstance(err, ssl.SSLError):
        return TLS_FAILED
    if isinstance(err, http.client.IncompleteRead):  # a chunked body cut mid-chunk
        return TRUNCATED
    if isinstance(err, http.client.LineTooLong) or "got more than" in str(err):  # header line / count
        return BAD_RESPONSE
    if isinstance(err, http.client.BadStatusLine) and not isinstance(err, http.client.RemoteDisconnected):
        return BAD_RESPONSE
    return CONNECT_FAILED


@dataclass
class GuardedFetcher:
    """GET with the guard on every hop, per-host politeness, size and time limits."""

    guard: NetworkGuard
    user_agent: str
    timeout: float = 10.0
    max_bytes: int = 5 * 1024 * 1024
    max_redirects: int = 5
    limiter: Optional[HostLimiter] = None

    def get(self, url: str, *, polite: bool = True,
            hop_check: Optional[Callable[[str], Optional[tuple[str, str]]]] = None) -> Response:
        """Follow redirects. Every hop passes the guard first, then `hop_check(url)` (robots.txt for
        the crawler), which may refuse it with (reason, detail)."""
        hops: list[str] = []
        current = url
        for _ in range(self.max_redirects + 1):
            decision = self.guard.check_url(current)
            if not decision.allowed:
                # Refused before any connection is opened.
                return Response(current, reason=decision.reason, detail=decision.detail, redirects=hops)
            refused = hop_check(current) if hop_check else None
            if refused:
                return Response(current, reason=refused[0], detail=refused[1], redirects=hops)
            try:
                answer = self._request(decision, current, polite)
            except HostBusy as err:
                return Response(current, reason=err.reason, detail=str(err), redirects=hops)
            answer.redirects = hops
            location = answer.headers.get("Location") if answer.status in _REDIRECTS else None
            if answer.reason or not location:
                if answer.reason is None and answer.status is not None:
                    failed = reason_for_status(answer.status)
                    if failed:
                        answer.reason = failed
                        answer.detail = f"{current}: HTTP {answer.status} {answer.reason_phrase}".rstrip()
                return answer
            hops.append(current)
            current = urljoin(current, location.strip())
            if not current.lower().startswith(("http://", "https://")):
                return Response(current, reason=BAD_URL, detail=f"{hops[-1]}: redirect to {location[:200]!r}",
                                redirects=hops)
        return Response(current, reason=TOO_MANY_REDIRECTS,
                        detail=f"{url}: more than {self.max_redirects} redirects", redirects=hops)

    def _request(self, decision: Decision, url: str, polite: bool) -> Response:
        headers = {"User-Agent": self.user_agent, "Accept-Encoding": "identity", "Connection": "close"}
        if self.limiter is None or not polite:
            return fetch_once(self.guard, decision, url, timeout=self.timeout, max_bytes=self.max_bytes,
                              headers=headers)
        with self.limiter.slot(decision.host):
            return fetch_once(self.guard, decision, url, timeout=self.timeout, max_bytes=self.max_bytes,
                              headers=headers)
