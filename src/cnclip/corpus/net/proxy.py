"""A local forward HTTP proxy that puts the network guard and per-host politeness in front of
img2dataset, whose workers fetch with `urllib.request.urlopen` in spawned processes where no
in-process patch reaches.

The download stage starts it on 127.0.0.1 and hands its URL to the workers through `http_proxy` /
`https_proxy` (urllib honours both; HTTPS goes through CONNECT). For every request, and so for
every redirect hop (urllib follows redirects client-side, each hop a new request through here),
the proxy resolves the host, checks every address, connects to the checked address itself (no
second lookup, no rebinding gap), waits for the host's turn, and enforces the size and time
limits. `file://` requests reach it too (`file_proxy`): corpus.local_files reads them, from
`download.allow_local_files` only, under the same limits. Refusals are answered with a status
line that carries a stable marker, `403 cnclip-guard network:blocked_address 127.0.0.2`, which
ends up in img2dataset's error message and maps back with `reason_from_error_message`.
"""

from __future__ import annotations

import collections
import contextlib
import os
import select
import socket
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterator, Optional, Sequence
from urllib.parse import urlsplit

from cnclip.corpus.recipe.crawl import GuardSettings
from cnclip.corpus.net.fetch import GuardedFetcher, Response, fetch_once
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
    reason_for_status,
    reason_from_error_message,
)
from cnclip.corpus.net.local_files import file_subject, is_file_url, read_local_file, resolve_roots
from cnclip.corpus.net.guard import NetworkGuard
from cnclip.corpus.net.politeness import DEFAULT_USER_AGENT, HostBusy, HostLimiter, RobotsCache

__all__ = ["GuardProxy", "ProxyConfig", "proxy_environment", "reason_from_error_message"]

_HOP_BY_HOP = {"connection", "proxy-connection", "keep-alive", "proxy-authorization", "proxy-authenticate",
               "te", "trailer", "transfer-encoding", "upgrade", "content-length"}
_STATUS_FOR = {BAD_URL: 400, UNSUPPORTED_SCHEME: 400, BLOCKED_ADDRESS: 403, ROBOTS_DISALLOWED: 403,
               DNS_FAILED: 502, CONNECT_FAILED: 502, TOO_LARGE: 502, HOST_BUSY: 503, TIMEOUT: 504,
               TRUNCATED: 502, BAD_RESPONSE: 502, LOCAL_FILE_NOT_ALLOWED: 403, NOT_REGULAR_FILE: 403,
               LOCAL_FILE_UNREADABLE: 404}
_ROBOTS_MAX_BYTES = 512 * 1024  # RFC 9309 asks crawlers to read at least 500 KiB


@dataclass(frozen=True)
class ProxyConfig:
    allow_networks: Sequence[str] = ()
    max_response_bytes: int = 20 * 1024 * 1024
    request_timeout: float = 10.0  # per upstream request (per CONNECT tunnel), everything included
    per_host_concurrency: int = 4
    per_host_delay: float = 0.1
    per_host_max_wait: float = 60.0
    obey_robots_for_images: bool = False
    user_agent: str = DEFAULT_USER_AGENT
    max_crawl_delay: float = 30.0
    allow_local_files: Sequence[str] = ()  # folders file:// URLs may read from (none: every one refused)

    @classmethod
    def from_settings(cls, settings: GuardSettings, request_timeout: float) -> "ProxyConfig":
        return cls(tuple(settings.allow_networks), settings.max_response_bytes, float(request_timeout),
                   settings.per_host_concurrency, settings.per_host_delay, settings.per_host_max_wait,
                   settings.obey_robots_for_images, settings.user_agent, settings.max_crawl_delay,
                   allow_local_files=tuple(getattr(settings, "allow_local_files", ())))

    @property
    def client_timeout(self) -> float:
        """The timeout to give the client (img2dataset): a queued request must not time out
        in the client while it waits here for its host's turn."""
        return self.request_timeout + self.per_host_max_wait + 5.0


class _Handler(BaseHTTPRequestHandler):
    server: "GuardProxy"
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self._forward()

    def do_HEAD(self) -> None:  # noqa: N802
        self._forward()

    def do_CONNECT(self) -> None:  # noqa: N802
        self._tunnel()

    def log_message(self, format: str, *args) -> None:  # the stats say what happened
        pass

    def _refuse(self, reason: str, subject: str, detail: str) -> None:
        self.server.count(reason)
        body = f"{MARKER}: {reason} {subject}\n{detail}\n".encode("utf-8", errors="replace")
        phrase = f"{MARKER} {reason} {subject}".replace("\r", " ").replace("\n", " ")[:200]
        phrase = phrase.encode("ascii", "backslashreplace").decode("ascii")  # a status line is Latin-1
        self.close_connection = True
        self.send_response(_STATUS_FOR.get(reason, 403), phrase)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Cnclip-Guard", reason)
        self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _forward(self) -> None:
        url, config, proxy = self.path, self.server.config, self.server
        if is_file_url(url):  # urllib hands file:// here through file_proxy (see environment())
            answer = read_local_file(url, proxy.local_roots, max_bytes=config.max_response_bytes,
                                     timeout=config.request_timeout)
            return self._answer(answer, file_subject(url))
        decision = proxy.guard.check_url(url)
        if not decision.allowed:
            return self._refuse(decision.reason or BLOCKED_ADDRESS, decision.address or decision.host or url[:80],
                                decision.detail)
        refusal = proxy.robots_refusal(url)
        if refusal:
            return self._refuse(refusal[0], decision.host, refusal[1])
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
        headers["Connection"] = "close"
        # The recipe's user agent names the tool to image hosts too, as robots.txt was read with
        # it (over https the client's own agent travels inside the tunnel).
        headers["User-Agent"] = config.user_agent
        try:
            with proxy.limiter.slot(decision.host, config.per_host_max_wait):
                answer = fetch_once(proxy.guard, decision, url, timeout=config.request_timeout,
                                    max_bytes=config.max_response_bytes, headers=headers, method=self.command)
        except HostBusy as err:
            return self._refuse(HOST_BUSY, decision.host, str(err))
        self._answer(answer, decision.host)

    def _answer(self, answer: Response, subject: str) -> None:
        """Relay an upstream answer (or a local file), or refuse with its reason."""
        proxy = self.server
        if answer.reason:
            return self._refuse(answer.reason, subject, answer.detail)
        status = answer.status or 0
        proxy.count(reason_for_status(status) or ("redirect" if 300 <= status < 400 else "ok"))
        self.close_connection = True
        self.send_response(answer.status or 502, answer.reason_phrase)
        for name, value in answer.headers.items():
            if name.lower() not in _HOP_BY_HOP:
                self.send_header(name, value)
        self.send_header("Content-Length", str(len(answer.body)))
        self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(answer.body)

    def _tunnel(self) -> None:
        config, proxy = self.server.config, self.server
        host, _, port_text = self.path.rpartition(":")
        host = host.strip("[]")
        if not host or not port_text.isdigit():
            return self._refuse(BAD_URL, self.path[:80], f"CONNECT {self.path[:200]}: expected host:port")
        decision = proxy.guard.check_host(host, int(port_text))
        if not decision.allowed:
            return self._refuse(decision.reason or BLOCKED_ADDRESS, decision.address or host, decision.detail)
        # The path is encrypted: robots.txt can only set this host's Crawl-delay here.
        proxy.robots_refusal(f"https://{self.path}/")
        try:
            with proxy.limiter.slot(decision.host, config.per_host_max_wait):
                try:
                    upstream = proxy.guard.connect(decision, config.request_timeout)
                except OSError as err:
                    return self._refuse(CONNECT_FAILED, host, f"{host}:{port_text}: {err}")
                with upstream:
                    self.send_response(200, "Connection established")
                    self.end_headers()
                    self.close_connection = True
                    proxy.count(self._pump(upstream, time.monotonic() + config.request_timeout))
        except HostBusy as err:
            return self._refuse(HOST_BUSY, decision.host, str(err))

    def _pump(self, upstream: socket.socket, deadline: float) -> str:
        """Relay bytes both ways until either side closes, the deadline or the size limit."""
        # TLS records and the handshake add a few percent over the response body.
        limit = int(self.server.config.max_response_bytes * 1.05) + 64 * 1024
        client, received = self.connection, 0
        # Bytes the client sent right after CONNECT may already sit in our read buffer, where
        # select() cannot see them; a non-blocking read1 hands them over without waiting.
        client.settimeout(0)
        pending = self.rfile.read1(65536)
        client.settimeout(None)
        try:
            if pending:
                upstream.sendall(pending)
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return TIMEOUT
                readable, _, _ = select.select([client, upstream], [], [], remaining)
                for sock in readable:
                    data = sock.recv(65536)
                    if not data:
                        return "ok"
                    other = upstream if sock is client else client
                    other.settimeout(max(0.01, deadline - time.monotonic()))
                    other.sendall(data)
                    if sock is upstream:
                        received += len(data)
                        if received > limit:
                            return TOO_LARGE
        except OSError:  # either side reset or stalled: the client sees a broken tunnel
            return CONNECT_FAILED


class GuardProxy(ThreadingHTTPServer):
    """The proxy server; use as a context manager, then `proxy_environment(proxy)` for clients."""

    daemon_threads = True
    request_queue_size = 256  # img2dataset opens processes x threads connections at once; 5 drops SYNs

    def __init__(self, config: ProxyConfig, guard: Optional[NetworkGuard] = None, port: int = 0):
        self.config = config
        self.guard = guard or NetworkGuard(config.allow_networks)
        self.local_roots = resolve_roots(config.allow_local_files)
        self.limiter = HostLimiter(config.per_host_concurrency, config.per_host_delay)
        self._counts: collections.Counter = collections.Counter()
        self._count_lock = threading.Lock()
        self._robots: Optional[RobotsCache] = None
        if config.obey_robots_for_images:
            fetcher = GuardedFetcher(self.guard, config.user_agent, config.request_timeout, _ROBOTS_MAX_BYTES)
            self._robots = RobotsCache(lambda url: fetcher.get(url, polite=False), config.user_agent)
        # Drop clients that connect and never send a request line.
        handler = type("_Handler", (_Handler,), {"timeout": config.client_timeout})
        super().__init__(("127.0.0.1", port), handler)
        self._thread = threading.Thread(target=self.serve_forever, name="guard-proxy", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def environment(self) -> dict[str, str]:
        """Variables for the client processes; an empty no_proxy so no host skips the guard.

        ftp_proxy too: urllib follows a redirect to ftp:// and, with no proxy for that scheme,
        would connect directly; through the proxy such a hop is refused as an unsupported scheme.
        file_proxy: urllib would read file:// URLs itself, with no size cap or timeout; with it,
        it asks the proxy (`GET file:///path`), which applies allow_local_files and the limits.
        """
        names = ("http_proxy", "https_proxy", "ftp_proxy", "file_proxy")
        proxies = {name: self.url for name in names} | {name.upper(): self.url for name in names}
        return proxies | {"no_proxy": "", "NO_PROXY": ""}

    def handle_error(self, request, client_address) -> None:
        # A client that hung up mid-answer, or a request no rule foresaw: count it, no traceback
        # per request on the build's console.
        self.count("proxy:error")

    def count(self, outcome: str) -> None:
        with self._count_lock:
            self._counts[outcome] += 1

    def stats(self) -> dict[str, int]:
        """Requests by outcome: `ok`, `redirect` (relayed, the client asks again) or a reason code
        (`network:blocked_address`, `network:rate_limited` for a relayed 429…)."""
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
        if verdict.crawl_delay:
            self.limiter.set_host_delay(urlsplit(url).hostname or "", verdict.crawl_delay)
        return None if verdict.allowed else (ROBOTS_DISALLOWED, verdict.detail)

    def __enter__(self) -> "GuardProxy":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
        self.server_close()


@contextlib.contextmanager
def proxy_environment(proxy: GuardProxy) -> Iterator[dict[str, str]]:
    """Set the proxy variables in os.environ (spawned workers inherit them), restore on exit."""
    variables = proxy.environment()
    saved = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    try:
        yield variables
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
