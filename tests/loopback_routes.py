"""A scripted HTTP server on 127.0.0.1 for the crawl and guard tests: routes answer with a fixed
(status, headers, body) or a callable, and every request is recorded (path, time, headers)."""

from __future__ import annotations

import io
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Union

from PIL import Image

Answer = tuple[int, dict, bytes]
Route = Union[Answer, Callable[["Hit"], Answer]]


@dataclass
class Hit:
    path: str
    at: float
    headers: dict
    client: str


def jpeg_bytes(side: int = 48, color=(200, 40, 40)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (side, side), color).save(buffer, format="JPEG")
    return buffer.getvalue()


def html(body: str, charset: str = "utf-8", content_type: str | None = None, **headers) -> Answer:
    encoded = body.encode(charset)
    ctype = content_type if content_type is not None else f"text/html; charset={charset}"
    return 200, {"Content-Type": ctype, **headers}, encoded


class _Handler(BaseHTTPRequestHandler):
    server: "RouteServer"

    def do_GET(self) -> None:  # noqa: N802
        hit = Hit(self.path, time.monotonic(), dict(self.headers.items()), self.client_address[0])
        with self.server.lock:
            self.server.hits.append(hit)
        route = self.server.routes.get(self.path.split("?", 1)[0])
        if route is None and self.server.fallback is not None:
            route = self.server.fallback
        if route is None:
            status, headers, body = 404, {"Content-Type": "text/plain"}, b"not found"
        else:
            status, headers, body = route(hit) if callable(route) else route
        self.send_response(status)
        for name, value in headers.items():
            if value is not None:  # None: leave the header out (no Content-Length added either)
                self.send_header(name, value)
        if "Content-Length" not in headers:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args) -> None:
        pass


class RouteServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, routes: dict[str, Route] | None = None, fallback: Route | None = None):
        self.routes = dict(routes or {})
        self.fallback = fallback
        self.hits: list[Hit] = []
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _Handler)
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    @property
    def port(self) -> int:
        return self.server_address[1]

    def paths(self) -> list[str]:
        with self.lock:
            return [h.path for h in self.hits]

    def __enter__(self) -> "RouteServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
        self.server_close()
