"""The html and warc source kinds: decoding, extraction, politeness and the guard, against sites
on 127.0.0.1 the tests serve, and WARC/WAT files the tests write with warcio."""

import io
import json
import threading
import time
from pathlib import Path

import polars as pl
import pytest
from warcio.statusandheaders import StatusAndHeaders
from warcio.warcwriter import WARCWriter

from cnclip.corpus.net.fetch import GuardedFetcher
from cnclip.corpus.net.guard import NetworkGuard
from cnclip.corpus.net.politeness import HostBusy, HostLimiter, opted_out, robots_token
from cnclip.corpus.net.reasons import is_transient
from cnclip.corpus.recipe.crawl import CrawlSettings, HtmlSource, WarcSource
from cnclip.corpus.sources.decode import decode_page
from cnclip.corpus.sources.extract import extract_page, largest_srcset_candidate
from cnclip.corpus.sources.html import crawl_html
from cnclip.corpus.sources.metadata import expand_paths
from cnclip.corpus.sources.warc import WarcReport, extract_warc_file
from loopback_routes import RouteServer, html, jpeg_bytes

GBK_TEXT = "朱镕基同志视察了上海浦东新区的建设工地，并和工人们亲切交谈。"  # 镕 is in GBK, not GB2312
GBK_ALT = "朱镕基在浦东新区"
BIG5_TEXT = "臺北市的夜景非常漂亮，許多遊客在這裡拍照留念，夜市也很熱鬧。"
BIG5_ALT = "臺北夜景的照片"


def settings(**overrides):
    values = dict(allow_networks=["127.0.0.1/32"], per_host_delay=0.0, per_host_concurrency=4, timeout=5,
                  workers=4)
    return CrawlSettings(**{**values, **overrides})


def source(*seeds, **overrides):
    return HtmlSource(name="web", kind="html", seeds=list(seeds), **overrides)


def rows(path):
    return pl.read_parquet(path).rows()


def extract_warc(source: WarcSource, out: Path) -> WarcReport:
    """A source's files (sorted, as ingest numbers them) through the per-file extractor ingest
    runs, with one report over all of them; their pairs in one Parquet, in file order."""
    report = WarcReport()
    parts = []
    for number, path in enumerate(expand_paths(source.path)):
        part = out.with_name(f"{out.stem}-{number}.parquet")
        extract_warc_file(path, source, part, report)
        parts.append(pl.read_parquet(part))
    pl.concat(parts).write_parquet(out)
    return report


# -- decoding ---------------------------------------------------------------------------------

def page(body: str, head: str = "") -> str:
    # A Traditional title: GBK has it too, Big5 has no Simplified characters.
    return f"<html><head>{head}<title>圖片新聞</title></head><body><p>{body}</p></body></html>"


@pytest.mark.parametrize("text, encoding, content_type, head, source", [
    (page(GBK_TEXT), "gbk", "text/html; charset=gb2312", "", "http"),      # GB2312 label, GBK bytes
    (page(GBK_TEXT), "gbk", "text/html", '<meta charset="gb2312">', "meta"),
    (page(GBK_TEXT), "gbk", "text/html", '<meta http-equiv="Content-Type" content="text/html; charset=GBK">', "meta"),
    (page(GBK_TEXT), "gbk", "text/html; charset=iso-8859-1", '<meta charset="gbk">', "meta"),  # a server default
    (page(GBK_TEXT), "gb18030", None, "", "detected"),
    (page(BIG5_TEXT), "big5", "text/html; charset=big5", "", "http"),
    (page(BIG5_TEXT), "big5", None, "", "detected"),
    (page(GBK_TEXT), "utf-8", "text/html; charset=gbk", "", "meta"),  # wrong label: bytes do not fit it
], ids=["gb2312-http", "gb2312-meta", "gbk-http-equiv", "latin1-http-gbk-meta", "gbk-undeclared", "big5-http",
        "big5-undeclared", "wrong-http-label"])
def test_pages_decode_by_http_charset_then_meta_then_detection(text, encoding, content_type, head, source):
    document = text.replace("<head>", "<head>" + head)
    if source == "meta" and encoding == "utf-8":
        document = document.replace("<head>", '<head><meta charset="utf-8">')
    decoded = decode_page(document.encode(encoding), content_type)
    assert decoded.text == document
    assert decoded.source == source


def test_a_bom_wins():
    assert decode_page(b"\xef\xbb\xbf" + page("你好").encode(), "text/html; charset=gbk").text == page("你好")


# -- extraction -------------------------------------------------------------------------------

def test_srcset_picks_the_largest_candidate():
    assert largest_srcset_candidate("a.jpg 320w, b.jpg 1280w, c.jpg 640w") == "b.jpg"
    assert largest_srcset_candidate("a.jpg, b.jpg 2x, c.jpg 1.5x") == "b.jpg"
    assert largest_srcset_candidate("https://x/a,b.jpg 100w, https://x/c.jpg 50w") == "https://x/a,b.jpg"
    assert largest_srcset_candidate("  ") is None


def test_extraction_resolves_base_lazy_load_and_srcset():
    document = """<html><head><base href="/static/"><meta name="robots" content="noimageindex"></head><body>
      <img src="a.jpg" alt="  相对路径的
         图片 ">
      <img src="data:image/gif;base64,R0lGOD" data-original="lazy/b.jpg" alt="懒加载的图片">
      <img src="/placeholder.gif" data-src="//cdn.example/c.jpg" alt="协议相对地址">
      <img src="small.jpg" srcset="m.jpg 640w, l.jpg 1280w" alt="响应式图片">
      <img zoomfile="forum/d.jpg" file="forum/d-thumb.jpg" src="none.gif" alt="论坛附件">
      <img src="e.jpg" title="只有标题">
      <img src="f.jpg">
      <img src="图片/猫 1.jpg" alt="中文路径">
      <img src="javascript:void(0)" alt="脚本">
      <a href="page2.html#top">下一页</a><a href="page2.html">again</a><a href="mailto:a@b.c">mail</a>
    </body></html>"""
    content = extract_page(document, "http://site.example/news/index.html")
    found = [(i.url, i.caption, i.alt_source) for i in content.images]
    assert found == [
        ("http://site.example/static/a.jpg", "相对路径的 图片", "alt"),
        ("http://site.example/static/lazy/b.jpg", "懒加载的图片", "alt"),
        ("http://cdn.example/c.jpg", "协议相对地址", "alt"),
        ("http://site.example/static/l.jpg", "响应式图片", "alt"),
        ("http://site.example/static/forum/d.jpg", "论坛附件", "alt"),
        ("http://site.example/static/%E5%9B%BE%E7%89%87/%E7%8C%AB%201.jpg", "中文路径", "alt"),  # as browsers send it
    ]
    assert content.images_without_alt == 2
    assert content.links == ["http://site.example/static/page2.html"]
    assert content.robots == ["noimageindex"]
    with_titles = extract_page(document, "http://site.example/news/index.html", title_fallback=True)
    assert ("http://site.example/static/e.jpg", "只有标题", "title") in [
        (i.url, i.caption, i.alt_source) for i in with_titles.images]


# -- politeness units ---------------------------------------------------------------------------

def test_opt_out_directives_and_robots_token():
    assert robots_token("cnclip/0.1 (+https://x.example/bot)") == "cnclip"
    assert opted_out(["noai, noimageai"], ["noai"], "cnclip") == "noai"
    assert opted_out(["cnclip: noimageai"], ["noimageai"], "cnclip") == "noimageai"
    assert opted_out(["otherbot: noai"], ["noai"], "cnclip") is None
    assert opted_out(["max-image-preview:large, noai"], ["noai"], "cnclip") == "noai"
    assert opted_out(["index, follow"], ["noai", "noimageai"], "cnclip") is None


def test_host_limiter_spaces_and_bounds_requests():
    limiter = HostLimiter(concurrency=1, min_delay=0.15)
    starts = []

    def request():
        with limiter.slot("a.example"):
            starts.append(time.monotonic())

    threads = [threading.Thread(target=request) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    starts.sort()
    assert all(b - a >= 0.12 for a, b in zip(starts, starts[1:], strict=False))  # 0.15 s apart, less scheduling jitter
    with limiter.slot("b.example"):
        with pytest.raises(HostBusy, match="b.example: no request slot within 0.1 s"):
            with limiter.slot("b.example", wait_timeout=0.1):
                pass


# -- crawling ---------------------------------------------------------------------------------


def test_crawl_extracts_pairs_from_utf8_gbk_and_big5_pages_politely(tmp_path, connections):
    big = "<html><body>" + "<p>很长的页面</p>" * 20_000 + "</body></html>"
    with RouteServer() as site:
        base = site.base
        site.routes.update({
            "/robots.txt": (200, {"Content-Type": "text/plain"},
                            b"User-agent: *\nDisallow: /private/\n\nUser-agent: otherbot\nDisallow: /\n"),
            "/": html(f"""<html><head><title>首页</title></head><body>
                <img src="img/home.jpg" alt="首页的横幅图片">
                <a href="/gbk.html">GBK</a> <a href="big5.html">Big5</a> <a href="/sub/base.html">base</a>
                <a href="/private/secret.html">私密</a> <a href="/noai.html">noai</a> <a href="/big.html">big</a>
                <a href="/moved">moved</a> <a href="/photo.jpg">not a page</a>
                <a href="http://127.0.0.2:{site.port}/elsewhere.html">另一个站点</a></body></html>"""),
            "/gbk.html": html(page(GBK_TEXT, '<meta charset="gb2312">').replace(
                "</p>", f'</p><img src="/img/zhu.jpg" alt="{GBK_ALT}">'), "gbk", "text/html"),
            "/big5.html": html(page(BIG5_TEXT).replace(
                "</p>", f'</p><img data-src="/img/taipei.jpg" src="data:," alt="{BIG5_ALT}">'), "big5",
                "text/html; charset=big5"),
            "/sub/base.html": html('<html><head><base href="/assets/"></head><body>'
                                   '<img srcset="s.jpg 1x, l.jpg 2x" alt="基准地址下的大图"></body></html>'),
            "/private/secret.html": html('<img src="/img/secret.jpg" alt="不该出现的图片">'),
            "/noai.html": html('<img src="/img/noai.jpg" alt="作者拒绝训练使用">', **{"X-Robots-Tag": "noai"}),
            "/big.html": html(big),
            "/moved": (302, {"Location": f"http://127.0.0.2:{site.port}/landing.html"}, b""),
            "/photo.jpg": (200, {"Content-Type": "image/jpeg"}, jpeg_bytes()),
        })
        out = tmp_path / "pairs.parquet"
        report = crawl_html(source(base + "/", max_depth=2, max_pages=50),
                            settings(max_response_bytes=100_000), out)
        served = site.paths()

    assert sorted(rows(out)) == sorted([
        (f"{base}/img/home.jpg", "首页的横幅图片", f"{base}/", "alt"),
        (f"{base}/img/zhu.jpg", GBK_ALT, f"{base}/gbk.html", "alt"),
        (f"{base}/img/taipei.jpg", BIG5_ALT, f"{base}/big5.html", "alt"),
        (f"{base}/assets/l.jpg", "基准地址下的大图", f"{base}/sub/base.html", "alt"),
    ])
    assert report.pairs == 4
    assert report.refused_pages == {
        "politeness:robots_disallowed": 1,   # /private/ (never requested)
        "politeness:opted_out": 1,           # X-Robots-Tag: noai
        "network:too_large": 1,              # /big.html over 100 kB
        "network:blocked_address": 1,        # /moved -> 127.0.0.2
        "crawl:not_html": 1,                 # /photo.jpg
    }
    assert report.dropped_images == {"politeness:opted_out": 1}
    assert any("127.0.0.2" in line and "network:blocked_address" in line for line in report.failures)
    assert "/private/secret.html" not in served and served.count("/robots.txt") == 1
    # The redirect to 127.0.0.2 and the off-site link were refused before any connection.
    assert set(connections) == {"127.0.0.1"}


def test_link_trap_stops_at_depth_and_page_limits(tmp_path):
    def trap(hit):
        n = int(hit.path.rsplit("/", 1)[1])
        links = "".join(f'<a href="/trap/{n * 10 + k}">{k}</a>' for k in range(1, 6))
        return html(f'<img src="/i/{n}.jpg" alt="陷阱页面第{n}张图片">{links}')

    with RouteServer(fallback=trap) as site:
        site.routes["/robots.txt"] = (404, {}, b"")
        seed = site.base + "/trap/0"
        deep = crawl_html(source(seed, max_depth=2, max_pages=1000), settings(), tmp_path / "a.parquet")
        assert deep.pages_visited == 1 + 5 + 25
        site.hits.clear()
        capped = crawl_html(source(seed, max_depth=50, max_pages=7), settings(), tmp_path / "b.parquet")
        pages = [p for p in site.paths() if p.startswith("/trap/")]
    assert capped.pages_visited == 7 and len(pages) == 7
    assert pages[0] == "/trap/0" and len(rows(tmp_path / "b.parquet")) == 7


def test_crawl_delay_is_honoured_and_long_ones_skip_the_host(tmp_path):
    pages = {f"/p{i}.html": html(f'<img src="/i{i}.jpg" alt="第{i}张延迟测试图片">') for i in range(3)}
    seeds = [f"/p{i}.html" for i in range(3)]
    with RouteServer({"/robots.txt": (200, {}, b"User-agent: cnclip\nCrawl-delay: 0.4\n"), **pages}) as site:
        report = crawl_html(source(*[site.base + s for s in seeds], max_depth=0), settings(), tmp_path / "a.parquet")
        starts = sorted(h.at for h in site.hits if h.path.startswith("/p"))
    assert report.pairs == 3 and len(starts) == 3
    assert all(b - a >= 0.3 for a, b in zip(starts, starts[1:], strict=False)), starts  # 0.4 s apart at the client

    with RouteServer({"/robots.txt": (200, {}, b"User-agent: *\nCrawl-delay: 3600\n"), **pages}) as site:
        report = crawl_html(source(*[site.base + s for s in seeds], max_depth=0), settings(), tmp_path / "b.parquet")
        assert [p for p in site.paths() if p != "/robots.txt"] == []
    assert report.refused_pages == {"politeness:crawl_delay_too_long": 3}


def test_robots_for_images_drops_disallowed_images(tmp_path):
    robots = b"User-agent: *\nDisallow: /img/private/\n"
    body = '<img src="/img/ok.jpg" alt="可以使用的图片"><img src="/img/private/no.jpg" alt="禁止抓取的图片">'
    with RouteServer({"/robots.txt": (200, {}, robots), "/": html(body)}) as site:
        report = crawl_html(source(site.base + "/"), settings(obey_robots_for_images=True), tmp_path / "p.parquet")
    assert [r[0] for r in rows(tmp_path / "p.parquet")] == [site.base + "/img/ok.jpg"]
    assert report.dropped_images == {"politeness:robots_disallowed": 1}


def test_429_is_reported_as_transient_then_succeeds(tmp_path):
    answers = iter([(429, {"Retry-After": "1"}, b"slow down"), html('<img src="/a.jpg" alt="重试后成功的图片">')])
    with RouteServer({"/robots.txt": (404, {}, b""), "/busy.html": lambda hit: next(answers)}) as site:
        fetcher = GuardedFetcher(NetworkGuard(["127.0.0.1/32"]), "cnclip/0.1", timeout=5)
        first = fetcher.get(site.base + "/busy.html")
        assert (first.status, first.reason) == (429, "network:rate_limited") and is_transient(first.reason)
        second = fetcher.get(site.base + "/busy.html")
        assert second.ok and "重试后成功" in second.body.decode()


def test_a_server_that_stalls_costs_the_timeout_only(tmp_path):
    release = threading.Event()

    def stall(hit):
        release.wait(10)
        return html("late")

    with RouteServer({"/slow": stall}) as site:
        fetcher = GuardedFetcher(NetworkGuard(["127.0.0.1/32"]), "cnclip/0.1", timeout=0.5)
        began = time.monotonic()
        answer = fetcher.get(site.base + "/slow")
        release.set()
    assert answer.reason == "network:timeout" and time.monotonic() - began < 3


# -- WARC / WAT -------------------------------------------------------------------------------

def write_warc(path, records, gzip=True):
    with open(path, "wb") as stream:
        writer = WARCWriter(stream, gzip=gzip)
        for record in records(writer):
            writer.write_record(record)


def response(writer, url, body: bytes, content_type="text/html", status="200 OK", extra=()):
    headers = StatusAndHeaders(status, [("Content-Type", content_type), *extra], protocol="HTTP/1.1")
    return writer.create_warc_record(url, "response", payload=io.BytesIO(body), http_headers=headers)


def wat(writer, url, html_metadata, headers=None, warc_type="response"):
    envelope = {"WARC-Header-Metadata": {"WARC-Type": warc_type, "WARC-Target-URI": url},
                "Payload-Metadata": {"HTTP-Response-Metadata": {
                    "Response-Message": {"Status": "200"}, "Headers": headers or {"Content-Type": "text/html"},
                    "HTML-Metadata": html_metadata}}}
    payload = json.dumps({"Envelope": envelope}).encode()  # \uXXXX escapes, as Common Crawl writes them
    return writer.create_warc_record(url, "metadata", payload=io.BytesIO(payload),
                                     warc_headers_dict={"Content-Type": "application/json"})


def test_warc_and_wat_files_give_the_same_pairs_as_crawled_pages(tmp_path):
    gbk_page = page(GBK_TEXT, '<meta charset="gbk"><base href="http://cdn.example/pics/">').replace(
        "</p>", f'</p><img src="zhu.jpg" alt="{GBK_ALT}"><img data-original="lazy.jpg" src="x.gif" alt="懒加载">')
    write_warc(tmp_path / "a.warc.gz", lambda w: [
        response(w, "http://news.example/gbk.html", gbk_page.encode("gbk")),
        response(w, "http://news.example/img.jpg", jpeg_bytes(), "image/jpeg"),
        response(w, "http://news.example/gone.html", b"gone", status="404 Not Found"),
        response(w, "http://news.example/noai.html", '<img src="/n.jpg" alt="拒绝训练">'.encode(),
                 extra=[("X-Robots-Tag", "noimageai")]),
        response(w, "http://news.example/big.html", b"<p>" + b"x" * 5000 + b"</p>"),
    ])
    write_warc(tmp_path / "b.warc.wat.gz", lambda w: [
        wat(w, "http://blog.example/post/1.html", {
            "Head": {"Base": "http://img.blog.example/", "Metas": [{"name": "keywords", "content": "猫"}]},
            "Links": [{"path": "IMG@/src", "url": "cat.jpg", "alt": "一只橘猫在晒太阳"},
                      {"path": "IMG@/src", "url": "https://img.blog.example/dog.jpg", "alt": "  "},
                      {"path": "A@/href", "url": "/post/2.html", "text": "下一篇"},
                      {"path": "IMG@/src", "url": "bird.jpg", "title": "标题里的小鸟"}]}),
        wat(w, "http://blog.example/post/2.html",
            {"Links": [{"path": "IMG@/src", "url": "/optout.jpg", "alt": "不允许使用"}]},
            headers={"X-Robots-Tag": "noai"}),
        wat(w, "http://blog.example/post/1.html", {}, warc_type="request"),
    ])
    out = tmp_path / "pairs.parquet"
    report = extract_warc(WarcSource(name="cc", kind="warc", path=str(tmp_path / "*.gz"), title_fallback=True,
                                     max_record_bytes=4096), out)
    assert rows(out) == [
        ("http://cdn.example/pics/zhu.jpg", GBK_ALT, "http://news.example/gbk.html", "alt"),
        ("http://cdn.example/pics/lazy.jpg", "懒加载", "http://news.example/gbk.html", "alt"),
        ("http://img.blog.example/cat.jpg", "一只橘猫在晒太阳", "http://blog.example/post/1.html", "alt"),
        ("http://img.blog.example/bird.jpg", "标题里的小鸟", "http://blog.example/post/1.html", "title"),
    ]
    assert (report.files, report.pairs, report.images_without_alt) == (2, 4, 1)
    assert report.skipped_records == {"crawl:not_html": 1, "crawl:http_status": 1, "network:too_large": 1}
    assert report.dropped_images == {"politeness:opted_out": 2}
    assert report.file_errors == []


def test_a_truncated_warc_keeps_what_was_read_and_says_so(tmp_path):
    write_warc(tmp_path / "full.warc.gz", lambda w: [
        response(w, f"http://s.example/{i}.html", f'<img src="{i}.jpg" alt="第{i}页的图片说明">'.encode())
        for i in range(30)])
    data = (tmp_path / "full.warc.gz").read_bytes()
    (tmp_path / "cut.warc.gz").write_bytes(data[: len(data) * 2 // 3])
    (tmp_path / "full.warc.gz").unlink()
    (tmp_path / "junk.warc").write_bytes(b"<html>not a warc</html>\n")
    write_warc(tmp_path / "plain.warc", lambda w: [
        response(w, f"http://p.example/{i}.html",
                 (f'<img src="{i}.jpg" alt="未压缩的第{i}页图片">' + "<p>正文</p>" * 60).encode())
        for i in range(3)], gzip=False)
    data = (tmp_path / "plain.warc").read_bytes()
    (tmp_path / "plain.warc").write_bytes(data[: len(data) - 500])  # the last record loses its end
    report = extract_warc(WarcSource(name="cc", kind="warc", path=str(tmp_path / "*.warc*")), tmp_path / "p.parquet")
    kept = rows(tmp_path / "p.parquet")
    assert 5 < len([r for r in kept if "s.example" in r[0]]) < 30
    assert kept[0] == ("http://s.example/0.jpg", "第0页的图片说明", "http://s.example/0.html", "alt")
    # The cut-off third record of plain.warc gives nothing; the two whole ones do.
    assert [r[0] for r in kept if "p.example" in r[0]] == ["http://p.example/0.jpg", "http://p.example/1.jpg"]
    assert any("plain.warc: unreadable after 3 record(s) (TruncatedFile: record 3" in e for e in report.file_errors)
    assert len(report.file_errors) == 3
    assert any("cut.warc.gz: unreadable after" in e and "TruncatedFile" in e for e in report.file_errors)
    assert any("junk.warc: unreadable after 0 record(s) (ArchiveLoadFailed" in e for e in report.file_errors)


def test_a_wat_caption_cut_mid_character_does_not_fail_the_file(tmp_path):
    # json.loads turns the escaped half of an emoji into a lone surrogate, which UTF-8 cannot hold.
    broken = {"Links": [{"path": "IMG@/src", "url": "/a.jpg", "alt": "半个表情\ud83d"},
                        {"path": "IMG@/src", "url": "/b.jpg", "alt": "完整的标题"}]}
    write_warc(tmp_path / "x.warc.wat.gz", lambda w: [wat(w, "http://blog.example/p.html", broken)])
    out = tmp_path / "pairs.parquet"
    report = extract_warc(WarcSource(name="cc", kind="warc", path=str(tmp_path / "*.gz")), out)
    assert [r[1] for r in rows(out)] == ["半个表情\ufffd\ufffd\ufffd", "完整的标题"]
    assert report.file_errors == []


def test_meta_charset_utf16_on_an_ascii_compatible_page_reads_as_utf8():
    body = page("<img src='a.jpg' alt='雪山'>", '<meta charset="utf-16">').encode("utf-8")
    decoded = decode_page(body, "text/html")
    assert decoded.encoding == "utf-8" and "雪山" in decoded.text
    assert "雪山" in decode_page(page("雪山", '<meta charset="undefined">').encode(), None).text


def test_a_long_tail_without_closing_bracket_parses_in_linear_time():
    started = time.monotonic()
    content = extract_page('<img src="/a.jpg" alt="前面的图片">' + "if a<b then c<d; " * 20_000, "http://x.example/")
    assert time.monotonic() - started < 2
    assert [i.caption for i in content.images] == ["前面的图片"]


def test_gzipped_pages_are_inflated_within_the_size_limit(tmp_path):
    import gzip

    small = gzip.compress(page('<img src="/a.jpg" alt="压缩页面里的图片">').encode())
    bomb = gzip.compress(b"<p>" + b"x" * 3_000_000 + b"</p>")
    routes = {"/robots.txt": (404, {}, b""),
              "/": (200, {"Content-Type": "text/html; charset=utf-8", "Content-Encoding": "gzip"}, small),
              "/big.html": (200, {"Content-Type": "text/html", "Content-Encoding": "gzip"}, bomb)}
    with RouteServer(routes) as site:
        report = crawl_html(source(site.base + "/", site.base + "/big.html", max_depth=0),
                            settings(max_response_bytes=1_000_000), tmp_path / "pairs.parquet")
    assert [r[1] for r in rows(tmp_path / "pairs.parquet")] == ["压缩页面里的图片"]
    assert report.refused_pages == {"network:too_large": 1}
