"""`cnclip corpus index` and `cnclip search`: thin Typer commands over cnclip.search.

They import faiss, torch and polars only when they run, so `cnclip --help` stays light.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from cnclip._common.console import console, error, info
from cnclip._common.errors import CnclipError


def _fail(err: CnclipError):
    error(str(err))
    return typer.Exit(2)


def index(
    manifest_dir: Path = typer.Argument(..., help="a build's manifest_dir with embeddings/, e.g. manifests/demo"),
    kind: str = typer.Option("auto", "--kind", help="auto (flat up to 200,000 rows, else ivf), flat, ivf or hnsw"),
) -> None:
    """Build the vector index over the corpus's image embeddings, under MANIFEST_DIR/index/.

    Example: cnclip corpus index manifests/demo
    """
    from cnclip.search.index import build_index

    try:
        record = build_index(manifest_dir, kind)
    except CnclipError as err:
        raise _fail(err) from None
    params = ", ".join(f"{k}={v}" for k, v in record["params"].items())
    info(f"indexed {record['rows']} image embeddings ({record['width']} wide) as {record['kind']}"
         f"{f' ({params})' if params else ''} in {Path(manifest_dir) / 'index'}")


def search(
    manifest_dir: Path = typer.Argument(..., help="a build's manifest_dir with embeddings/"),
    query: Optional[str] = typer.Argument(None, help="the text to search for, e.g. 红色的圆形"),
    top: int = typer.Option(10, "--top", help="how many hits"),
    image: Optional[Path] = typer.Option(None, "--image", help="search by this image instead of a text"),
    model: Optional[Path] = typer.Option(None, "--model", help="the model (default: the one embeddings/model.json "
                                                               "names, which embedded the corpus)"),
    as_json: bool = typer.Option(False, "--json", help="print the hits as JSON lines"),
    serve: bool = typer.Option(False, "--serve", help="start a search page on 127.0.0.1 instead"),
    port: int = typer.Option(8765, "--port", help="the page's port with --serve (0: any free one)"),
    device: Optional[str] = typer.Option(None, "--device", help="auto (default), cpu or cuda"),
) -> None:
    """Search a built corpus by text or image: key, caption, URL and score of the nearest images.

    The index is built on first use (and rebuilt when the embeddings changed).

    Examples: cnclip search manifests/demo "红色的圆形" --top 10;
    cnclip search manifests/demo --image query.jpg; cnclip search manifests/demo --serve
    """
    from cnclip.search.query import Searcher

    try:
        if not serve and (query is None) == (image is None):
            raise _usage("give a text query or --image PATH (one of them)")
        searcher = Searcher.open(manifest_dir, model, device, notify=info)
        if serve:
            _serve(searcher, port)
            return
        hits = searcher.search(text=query, image=image, top=top)
    except CnclipError as err:
        raise _fail(err) from None
    if as_json:
        for hit in hits:
            typer.echo(json.dumps(hit, ensure_ascii=False))
    else:
        _print_table(hits, query if image is None else str(image))


def _usage(message: str) -> CnclipError:
    from cnclip.search.index import SearchError

    return SearchError(message)


def _print_table(hits: list[dict], asked: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{len(hits)} hits for {asked}")
    for name, justify in (("#", "right"), ("key", "left"), ("caption", "left"), ("url", "left"),
                          ("score", "right")):
        table.add_column(name, justify=justify, overflow="fold")
    for hit in hits:
        table.add_row(str(hit["rank"]), hit["key"], hit["caption"] or "", hit["url"] or "", f"{hit['score']:.4f}")
    Console(highlight=False).print(table)


def _serve(searcher, port: int) -> None:
    from cnclip.search.serve import make_server

    try:
        server = make_server(searcher, port)
    except OSError as err:
        raise _usage(f"--port {port}: cannot listen on 127.0.0.1 ({err.strerror or err})") from None
    console.print(f"searching {searcher.manifest_dir} at {server.url} (Ctrl-C stops)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
