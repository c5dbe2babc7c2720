"""`cnclip search MANIFEST_DIR --serve`: a small search page on 127.0.0.1, nothing else.

One query box and a grid of the hits' images, read from the corpus's own shards by key (the tar
members indexed once per shard, one member read per image request). The page is one HTML file
with its style and script inline: no CDN, no font, no request beyond this server; the samples'
source URLs are shown as text, never loaded. Routes:

    GET /                       the page
    GET /api/search?q=TEXT&top=N  {"query", "hits": [{rank, score, key, caption, url, shard, uid, image}]}
    GET /image/SHARD/KEY        the image bytes of that sample
"""

from __future__ import annotations

import json
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, quote, unquote, urlsplit

from cnclip._common.errors import CnclipError
from cnclip.search.query import Searcher
from cnclip.search.shards import ShardMembers

HOST = "127.0.0.1"  # loopback only: the page shows a corpus's images to whoever can reach it
MAX_TOP = 200
CONTENT_TYPES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png", ".webp": "image/webp"}

PAGE = """<!doctype html>
<html lang="zh"><head><meta charset="utf-8"><title>cnclip search</title>
<link rel="icon" href="data:,">
<style>
body{font-family:sans-serif;margin:1.5em;background:#fafafa;color:#222}
form{display:flex;gap:.5em;margin-bottom:1em}
input[type=text]{flex:1;font-size:1.1em;padding:.4em}
#grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(170px,1fr));gap:.8em}
figure{margin:0;background:#fff;border:1px solid #ddd;padding:.4em}
figure img{width:100%;height:auto;display:block}
figcaption{font-size:.85em;word-break:break-all}
.meta{color:#666;font-size:.8em}
#status{color:#666;margin-bottom:.6em}
</style></head>
<body><h1>cnclip search: __CORPUS__</h1>
<form id="form"><input type="text" id="q" name="q" placeholder="红色的圆形" autofocus>
<input type="number" id="top" name="top" value="10" min="1" max="__MAX_TOP__"><button type="submit">搜索</button></form>
<div id="status"></div><div id="grid"></div>
<script>
const grid = document.getElementById("grid"), status = document.getElementById("status");
function figure(hit) {
  const fig = document.createElement("figure");
  fig.className = "hit"; fig.dataset.key = hit.key; fig.dataset.rank = hit.rank;
  const img = document.createElement("img");
  img.src = hit.image; img.alt = hit.caption || hit.key;
  const cap = document.createElement("figcaption");
  cap.textContent = hit.caption || "";
  const meta = document.createElement("div");
  meta.className = "meta";
  meta.textContent = "#" + hit.rank + "  " + hit.key + "  " + hit.score.toFixed(3) + "  " + (hit.url || "");
  cap.appendChild(meta); fig.append(img, cap);
  return fig;
}
document.getElementById("form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const q = document.getElementById("q").value, top = document.getElementById("top").value;
  status.textContent = "…";
  const answer = await fetch("/api/search?q=" + encodeURIComponent(q) + "&top=" + encodeURIComponent(top));
  const body = await answer.json();
  grid.replaceChildren(...(body.hits || []).map(figure));
  status.textContent = body.error ? body.error : body.hits.length + " hits for " + body.query;
});
</script></body></html>
"""


class SearchServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, searcher: Searcher, port: int):
        super().__init__((HOST, port), Handler)
        self.searcher = searcher
        self.members = ShardMembers(searcher.manifest_dir)
        self.lock = threading.Lock()  # one query at a time through the model

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.server_address[1]}/"


class Handler(BaseHTTPRequestHandler):
    server: SearchServer

    def log_message(self, format, *args):  # noqa: A002 (http.server's name) -- quiet: one line per image is noise
        pass

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store" if content_type.startswith("application/json") else "max-age=3600")
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, payload: dict) -> None:
        self._send(status, json.dumps(payload, ensure_ascii=False).encode("utf-8"), "application/json; charset=utf-8")

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        parts = urlsplit(self.path)
        if parts.path == "/":
            corpus = str(self.server.searcher.manifest_dir).replace("&", "&amp;").replace("<", "&lt;")
            page = PAGE.replace("__CORPUS__", corpus).replace("__MAX_TOP__", str(MAX_TOP))
            self._send(HTTPStatus.OK, page.encode("utf-8"), "text/html; charset=utf-8")
        elif parts.path == "/api/search":
            self._search(parse_qs(parts.query))
        elif parts.path.startswith("/image/"):
            self._image(parts.path.removeprefix("/image/"))
        else:
            self._send(HTTPStatus.NOT_FOUND, b"not found", "text/plain")

    def _search(self, query: dict) -> None:
        text = query.get("q", [""])[0]
        try:
            top = min(MAX_TOP, int(query.get("top", ["10"])[0]))
            with self.server.lock:
                hits = self.server.searcher.search(text=text, top=top)
        except ValueError as err:  # a CnclipError (empty query, bad top) or a top that is no number
            message = str(err) if isinstance(err, CnclipError) else "top: not a number"
            self._json(HTTPStatus.BAD_REQUEST, {"query": text, "hits": [], "error": message})
            return
        for hit in hits:
            hit["image"] = f"/image/{hit['shard']}/{quote(hit['key'])}"
        self._json(HTTPStatus.OK, {"query": text, "hits": hits})

    def _image(self, rest: str) -> None:
        shard, _, key = rest.partition("/")
        try:
            name, data = self.server.members.image(int(shard), unquote(key))
        except (ValueError, KeyError, CnclipError):
            self._send(HTTPStatus.NOT_FOUND, b"no such image", "text/plain")
            return
        suffix = name[name.rfind("."):]
        self._send(HTTPStatus.OK, data, CONTENT_TYPES.get(suffix, "application/octet-stream"))


def make_server(searcher: Searcher, port: int = 0) -> SearchServer:
    """The server, bound to 127.0.0.1:`port` (0: a free port); call serve_forever() on it."""
    return SearchServer(searcher, port)
