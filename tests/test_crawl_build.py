"""Crawl sources, the network guard and --retry-failed inside real builds over 127.0.0.1."""

import json

import polars as pl
import pytest
from typer.testing import CliRunner

from cnclip.cli import app
from cnclip.corpus import build, run_download
from loopback_routes import RouteServer, html, jpeg_bytes
from test_crawl import response, write_warc

pytestmark = pytest.mark.slow
LOOPBACK_ONLY = ["127.0.0.1/32"]  # 127.0.0.2 is outside: the guard must refuse it before connecting


def image(color):
    return 200, {"Content-Type": "image/jpeg"}, jpeg_bytes(64, color)


def manifests(recipe):
    samples = pl.read_parquet(recipe.manifest_dir / "samples" / "*.parquet")
    parts = [pl.read_parquet(p) for p in sorted((recipe.manifest_dir / "rejected").glob("*.parquet"))]
    rejected = pl.concat(parts, how="diagonal_relaxed") if parts else None
    return samples, rejected


def test_html_and_warc_sources_build_a_corpus(tmp_path, make_recipe):
    gbk_page = '<html><head><meta charset="gbk"></head><body><img src="/img/a.jpg" alt="一只在雪地里的红狐狸">' \
               '<img data-src="/img/b.jpg" src="/blank.gif" alt="懒加载的蓝色天空"><a href="/p2.html">下一页</a>' \
               '</body></html>'
    routes = {
        "/": html(gbk_page, charset="gbk"),
        "/p2.html": html('<img srcset="/img/c-small.jpg 100w, /img/c.jpg 800w" alt="绿色的山谷和河流">'),
        "/robots.txt": (200, {"Content-Type": "text/plain"}, b"User-agent: *\nDisallow: /private/\n"),
        "/img/a.jpg": image((200, 30, 30)), "/img/b.jpg": image((30, 30, 200)), "/img/c.jpg": image((30, 200, 30)),
        "/img/w.jpg": image((90, 90, 90)),
    }
    with RouteServer(routes) as site:
        write_warc(tmp_path / "crawl.warc.gz", lambda w: [
            response(w, "http://archive.example/page.html",
                     f'<img src="{site.base}/img/w.jpg" alt="档案里的一张灰色照片">'.encode()),
        ])
        recipe = make_recipe(
            [{"name": "site", "kind": "html", "seeds": [site.base + "/"], "max_depth": 1},
             {"name": "archive", "kind": "warc", "path": str(tmp_path / "*.warc.gz")}],
            crawl={"allow_networks": LOOPBACK_ONLY, "per_host_delay": 0},
        )
        funnel = build(recipe, show_funnel=False)
    samples, _ = manifests(recipe)
    assert samples.select("source", "caption", "page_url").rows() == [
        ("site", "一只在雪地里的红狐狸", site.base + "/"),
        ("site", "懒加载的蓝色天空", site.base + "/"),
        ("site", "绿色的山谷和河流", site.base + "/p2.html"),
        ("archive", "档案里的一张灰色照片", "http://archive.example/page.html"),
    ]
    assert samples["url"][2] == site.base + "/img/c.jpg"  # the largest srcset candidate
    assert funnel["source_reports"]["site"]["pages_fetched"] == 2
    assert funnel["source_reports"]["archive"]["files"][0]["pairs"] == 1


def test_guard_rejects_blocked_addresses_with_their_reason(tmp_path, make_recipe):
    routes = {"/ok.jpg": image((10, 120, 10)),
              "/hop": (302, {"Location": "http://127.0.0.2:9/secret.jpg"}, b"")}
    with RouteServer(routes) as site:
        listing = tmp_path / "list.parquet"
        pl.DataFrame({"url": [f"{site.base}/ok.jpg", f"{site.base}/hop", "http://127.0.0.2:9/direct.jpg",
                              "http://0x7f000002:9/hex.jpg"],
                      "caption": ["一张可以下载的图片", "跳转到内网的图片", "直接指向内网的图片", "十六进制写法的地址"]}
                     ).write_parquet(listing)
        recipe = make_recipe([{"name": "m", "kind": "metadata", "path": str(listing)}],
                             download={"allow_networks": LOOPBACK_ONLY})
        funnel = build(recipe, show_funnel=False)
    samples, rejected = manifests(recipe)
    assert samples["row"].to_list() == [0]
    assert rejected.sort("row").select("row", "stage", "reason").rows() == [
        (1, "download", "network:blocked_address"),
        (2, "download", "network:blocked_address"),
        (3, "download", "network:blocked_address"),
    ]
    assert "127.0.0.2" in rejected.sort("row")["detail"][0]
    assert funnel["stages"][2]["rejected"] == {"network:blocked_address": 3}
    assert site.paths().count("/hop") == 1  # the redirect was served; its target never contacted


def test_retry_failed_fetches_only_transient_failures(tmp_path, make_recipe):
    calls = {"n": 0}

    def busy_then_ok(hit):
        calls["n"] += 1
        return (429, {"Retry-After": "1"}, b"slow down") if calls["n"] == 1 else image((200, 200, 30))

    routes = {"/ok.jpg": image((10, 10, 200)), "/busy.jpg": busy_then_ok,
              "/broken.jpg": (503, {}, b"down"), "/gone.jpg": (404, {}, b"")}
    with RouteServer(routes) as site:
        listing = tmp_path / "list.parquet"
        pl.DataFrame({"url": [f"{site.base}/{p}" for p in ("ok.jpg", "busy.jpg", "broken.jpg", "gone.jpg")],
                      "caption": ["第一张正常的图片", "第二张先限流的图片", "第三张总是出错的图片", "第四张已删除的图片"]}
                     ).write_parquet(listing)
        recipe = make_recipe([{"name": "m", "kind": "metadata", "path": str(listing)}])
        build(recipe, show_funnel=False)
        _, rejected = manifests(recipe)
        assert dict(rejected.select("row", "reason").rows()) == {
            1: "network:rate_limited", 2: "network:server_error", 3: "download:failed_to_download"}

        recipe_file = tmp_path / "recipe.yaml"
        recipe_file.write_text(json.dumps(recipe.model_dump(mode="json")), encoding="utf-8")
        result = CliRunner().invoke(app, ["corpus", "download", str(recipe_file), "--retry-failed"])
        assert result.exit_code == 0, result.output
        funnel = build(recipe, show_funnel=False)
        hits = site.paths()
    samples, rejected = manifests(recipe)
    assert sorted(samples["row"].to_list()) == [0, 1]
    assert dict(rejected.select("row", "reason").rows()) == {2: "network:server_error", 3: "download:failed_to_download"}
    # Transient failures were asked again, the permanent 404 and the successes were not.
    assert (hits.count("/busy.jpg"), hits.count("/broken.jpg"), hits.count("/gone.jpg"), hits.count("/ok.jpg")) == (
        2, 2, 1, 1)
    assert funnel["samples"] + funnel["rejected"] == funnel["input_rows"] == 4


def test_retry_needs_a_finished_download(make_recipe, tmp_path):
    listing = tmp_path / "list.parquet"
    pl.DataFrame({"url": ["http://127.0.0.1:9/a.jpg"], "caption": ["一张图片的标题"]}).write_parquet(listing)
    recipe = make_recipe([{"name": "m", "kind": "metadata", "path": str(listing)}])
    with pytest.raises(RuntimeError, match="needs a completed download stage"):
        run_download(recipe, retry_failed=True)
