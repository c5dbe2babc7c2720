"""The guard inside each download worker: urllib through the guarded opener, and img2dataset's
own downloader run in a lane with the opener installed. (These were the guard proxy's tests; the
same decisions are asserted on the same messages, the proxy-only mechanics replaced by their
in-worker equivalents.)

Only 127.0.0.1 is ever contacted: the guard allows 127.0.0.1/32 alone, and every test that
redirects elsewhere (127.0.0.2) checks that no connection was opened to it.
"""

import contextlib
import itertools
import json
import os
import socket
import threading
import time
import urllib.error
import urllib.request

import polars as pl
import pytest

from cnclip.corpus.net.opener import guarded_opener, guarded_urlopen
from cnclip.corpus.net.policy import GuardConfig, HostPolicy
from cnclip.corpus.net.reasons import is_transient, reason_from_error_message
from cnclip.corpus.recipe.crawl import GuardSettings
from loopback_routes import RouteServer, jpeg_bytes

IMAGE = jpeg_bytes(64)


def config(**overrides):
    values = dict(allow_networks=("127.0.0.1/32",), request_timeout=3.0, per_host_concurrency=4,
                  per_host_delay=0.0, per_host_max_wait=5.0, max_response_bytes=100_000)
    return GuardConfig(**{**values, **overrides})


@contextlib.contextmanager
def GuardProxy(cfg):  # noqa: N802 (the name the tests were written with: one worker's guard)
    yield HostPolicy(cfg)


def opener(policy):
    return guarded_opener(policy)


def error_of(call):
    try:
        call()
    except (urllib.error.URLError, OSError) as err:
        return str(err)
    raise AssertionError("the request was expected to fail")


def test_the_guard_relays_allowed_requests_and_refuses_others_with_a_marker(connections):
    with RouteServer() as site, GuardProxy(config()) as proxy:
        site.routes.update({
            "/ok.jpg": (200, {"Content-Type": "image/jpeg"}, IMAGE),
            "/moved.jpg": (302, {"Location": f"http://127.0.0.2:{site.port}/stolen.jpg"}, b""),
            "/huge.jpg": (200, {"Content-Type": "image/jpeg"}, os.urandom(300_000)),
        })
        client = opener(proxy)
        assert client.open(site.base + "/ok.jpg", timeout=10).read() == IMAGE
        # Decimal spelling of 127.0.0.1: parsed like the C resolver, allowed, fetched.
        assert client.open(f"http://2130706433:{site.port}/ok.jpg", timeout=10).read() == IMAGE
        redirected = error_of(lambda: client.open(site.base + "/moved.jpg", timeout=10))
        hex_host = error_of(lambda: client.open(f"http://0x7f000002:{site.port}/ok.jpg", timeout=10))
        huge = error_of(lambda: client.open(site.base + "/huge.jpg", timeout=10))
        tunnel = error_of(lambda: client.open(f"https://127.0.0.2:{site.port}/x.jpg", timeout=10))
        stats = proxy.stats()
        served = site.paths()
    assert redirected == "HTTP Error 403: cnclip-guard network:blocked_address 127.0.0.2"
    assert reason_from_error_message(redirected) == "network:blocked_address"
    assert reason_from_error_message(hex_host) == "network:blocked_address" and "127.0.0.2" in hex_host
    assert huge.startswith("HTTP Error 502: cnclip-guard network:too_large")
    assert tunnel == "HTTP Error 403: cnclip-guard network:blocked_address 127.0.0.2"  # checked before any TLS
    assert served == ["/ok.jpg", "/ok.jpg", "/moved.jpg", "/huge.jpg"]
    assert stats == {"ok": 2, "redirect": 1, "network:blocked_address": 3, "network:too_large": 1}
    assert set(connections) == {"127.0.0.1"}   # 127.0.0.2 was never contacted


def test_a_name_is_resolved_once_and_the_checked_address_is_the_one_connected_to(connections):
    """DNS rebinding: any lookup after each request's own would answer 127.0.0.2; http and https
    connect to the answer that was checked."""
    from cnclip.corpus.net.guard import NetworkGuard

    answers = []

    def rebinding(host, port):
        answers.append(host)
        return ["127.0.0.1"] if len(answers) <= 2 else ["127.0.0.2"]

    with RouteServer({"/t.jpg": (200, {"Content-Type": "image/jpeg"}, IMAGE)}) as site:
        policy = HostPolicy(config(), NetworkGuard(("127.0.0.1/32",), resolver=rebinding))
        client = opener(policy)
        assert client.open(f"http://images.test:{site.port}/t.jpg", timeout=10).read() == IMAGE
        # A plain-HTTP server cannot complete a TLS handshake: the failure is TLS's, after connecting.
        tls = error_of(lambda: client.open(f"https://images.test:{site.port}/t.jpg", timeout=10))
    assert answers == ["images.test", "images.test"]  # one lookup per request, none at connect time
    assert set(connections) == {"127.0.0.1"}
    assert reason_from_error_message(tls) == "network:tls_failed"


def test_429_then_200_is_a_transient_failure_then_a_success():
    answers = iter([(429, {"Retry-After": "1"}, b"slow down"), (200, {"Content-Type": "image/jpeg"}, IMAGE)])
    with RouteServer({"/busy.jpg": lambda hit: next(answers)}) as site, GuardProxy(config()) as proxy:
        client = opener(proxy)
        first = error_of(lambda: client.open(site.base + "/busy.jpg", timeout=10))
        assert client.open(site.base + "/busy.jpg", timeout=10).read() == IMAGE
        stats = proxy.stats()
    assert first == "HTTP Error 429: Too Many Requests"
    assert reason_from_error_message(first) == "network:rate_limited" and is_transient("network:rate_limited")
    assert stats == {"network:rate_limited": 1, "ok": 1}


def test_per_host_spacing_queueing_and_time_limits():
    release = threading.Event()
    routes = {f"/{i}.jpg": (200, {"Content-Type": "image/jpeg"}, IMAGE) for i in range(3)}
    routes["/hang.jpg"] = lambda hit: (release.wait(10), (200, {}, IMAGE))[1]
    with RouteServer(routes) as site:
        with GuardProxy(config(per_host_concurrency=1, per_host_delay=0.3)) as proxy:
            client = opener(proxy)
            threads = [threading.Thread(target=lambda i=i: client.open(f"{site.base}/{i}.jpg", timeout=10).read())
                       for i in range(3)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        starts = sorted(h.at for h in site.hits)
        assert len(starts) == 3, starts
        assert all(b - a >= 0.2 for a, b in itertools.pairwise(starts)), starts  # 0.3 s apart at the proxy

        with GuardProxy(config(per_host_concurrency=1, request_timeout=1.5, per_host_max_wait=0.3)) as proxy:
            client = opener(proxy)
            results = {}
            hang = threading.Thread(target=lambda: results.update(hang=error_of(
                lambda: client.open(site.base + "/hang.jpg", timeout=10))))
            hang.start()
            time.sleep(0.4)  # the hanging request holds the host's only slot
            results["queued"] = error_of(lambda: client.open(site.base + "/0.jpg", timeout=10))
            hang.join()
            release.set()
    assert reason_from_error_message(results["queued"]) == "network:host_busy"
    assert results["hang"].startswith("HTTP Error 504: cnclip-guard network:timeout")


def test_robots_for_images_when_configured():
    robots = (200, {"Content-Type": "text/plain"}, b"User-agent: *\nDisallow: /private/\n")
    routes = {"/robots.txt": robots, "/private/a.jpg": (200, {}, IMAGE), "/public/a.jpg": (200, {}, IMAGE)}
    with RouteServer(routes) as site, GuardProxy(config(obey_robots_for_images=True)) as proxy:
        client = opener(proxy)
        assert client.open(site.base + "/public/a.jpg", timeout=10).read() == IMAGE
        refused = error_of(lambda: client.open(site.base + "/private/a.jpg", timeout=10))
        served = site.paths()
    assert reason_from_error_message(refused) == "politeness:robots_disallowed"
    assert served == ["/robots.txt", "/public/a.jpg"]


def test_settings_map_onto_the_guard_and_the_opener_is_restored(monkeypatch, connections):
    # A proxy in the environment must not carry the worker's requests around the guard.
    monkeypatch.setenv("http_proxy", "http://127.0.0.2:9")
    settings = GuardSettings(allow_networks=["127.0.0.0/8"], per_host_concurrency=3, per_host_delay=0.5)
    cfg = GuardConfig.from_settings(settings, request_timeout=7)
    assert (cfg.allow_networks, cfg.per_host_concurrency, cfg.per_host_delay, cfg.request_timeout) == (
        ("127.0.0.0/8",), 3, 0.5, 7.0)
    assert cfg.client_timeout == 7 + settings.per_host_max_wait + 5
    # Spread over 2 lanes, each holds half of the host's concurrency and twice its spacing.
    assert (cfg.spread(2).lane_concurrency, cfg.spread(2).lane_delay) == (1, 1.0)
    before = urllib.request._opener
    with RouteServer({"/a.jpg": (200, {}, IMAGE)}) as site:
        with guarded_urlopen(config()) as policy:
            assert urllib.request.urlopen(site.base + "/a.jpg", timeout=10).read() == IMAGE
        assert policy.stats() == {"ok": 1}
    assert urllib.request._opener is before
    assert set(connections) == {"127.0.0.1"}


def lane_arguments(output, **overrides):
    """The img2dataset arguments a lane runs with (stages/download.py's img2dataset_arguments)."""
    return dict(image_size=32, resize_mode="no", resize_only_if_bigger=False, encode_quality=95,
                encode_format="jpg", min_image_size=0, max_image_area=float("inf"), max_aspect_ratio=float("inf"),
                thread_count=2, extract_exif=False, output_folder=str(output), timeout=10,
                number_sample_per_shard=100, compute_hash="sha256", retries=0, user_agent_token=None,
                disallowed_header_directives=None) | overrides


def test_img2dataset_workers_fetch_through_the_guard(tmp_path, connections):
    """img2dataset's own downloader in a lane: each row's recorded error maps to its reason.
    (Lanes in spawned workers: test_download_lanes.py and every build test.)"""
    from cnclip.corpus.stages.download_lanes import lane_tasks, run_lane
    from cnclip.corpus.stages.download_routing import write_plan

    answers = iter([(429, {}, b"slow down")] + [(200, {"Content-Type": "image/jpeg"}, IMAGE)] * 5)
    with RouteServer() as site:
        site.routes.update({
            "/ok.jpg": (200, {"Content-Type": "image/jpeg"}, IMAGE),
            "/moved.jpg": (302, {"Location": f"http://127.0.0.2:{site.port}/inside.jpg"}, b""),
            "/huge.jpg": (200, {"Content-Type": "image/jpeg"}, os.urandom(300_000)),
            "/busy.jpg": lambda hit: next(answers),
        })
        urls = {"ok": f"{site.base}/ok.jpg", "decimal": f"http://2130706433:{site.port}/ok.jpg",
                "redirect": f"{site.base}/moved.jpg", "hex": f"http://0x7f000002:{site.port}/ok.jpg",
                "huge": f"{site.base}/huge.jpg", "busy": f"{site.base}/busy.jpg"}
        rows = pl.DataFrame({"uid": range(len(urls)), "url": list(urls.values()), "caption": list(urls)})
        cfg = config()
        plan = write_plan(rows, tmp_path / "in", "plan.parquet", lanes=1, per_host=1, per_part=100, first_part=0)
        (task,) = lane_tasks(plan, tmp_path / "in", lane_arguments(tmp_path / "out"), cfg)
        (tmp_path / "out").mkdir()
        stats = run_lane(task)  # a lane's worker body, here in this process so connections sees it
        served = site.paths()
    result = pl.read_parquet(tmp_path / "out" / "*.parquet")
    outcome = {row["caption"]: (row["status"], reason_from_error_message(row["error_message"]))
               for row in result.iter_rows(named=True)}
    assert outcome == {
        "ok": ("success", None),
        "decimal": ("success", None),
        "redirect": ("failed_to_download", "network:blocked_address"),
        "hex": ("failed_to_download", "network:blocked_address"),
        "huge": ("failed_to_download", "network:too_large"),
        "busy": ("failed_to_download", "network:rate_limited"),
    }
    assert stats == {"ok": 2, "redirect": 1, "network:blocked_address": 2, "network:too_large": 1,
                     "network:rate_limited": 1}
    assert sorted(served) == sorted(["/ok.jpg", "/ok.jpg", "/moved.jpg", "/huge.jpg", "/busy.jpg"])
    # The worker talked only to 127.0.0.1.
    assert "127.0.0.2" not in connections
    assert json.loads((tmp_path / "out" / "00000_stats.json").read_text())["successes"] == 2


def test_a_redirect_to_ftp_goes_through_the_guard_and_is_refused(connections):
    routes = {"/hop.jpg": (302, {"Location": "ftp://127.0.0.2:2121/secret.jpg"}, b"")}
    with RouteServer(routes) as site, guarded_urlopen(config()):
        # urllib's own FTPHandler would follow ftp:// directly; the worker's opener has none.
        message = error_of(lambda: urllib.request.urlopen(site.base + "/hop.jpg", timeout=10))
    assert reason_from_error_message(message) == "network:unsupported_scheme"
    assert "127.0.0.2" not in connections


def test_image_requests_carry_the_recipes_user_agent():
    with RouteServer({"/a.jpg": (200, {"Content-Type": "image/jpeg"}, IMAGE)}) as site:
        with GuardProxy(config(user_agent="cnclip/9 (+https://example.org/contact)")) as proxy:
            request = urllib.request.Request(site.base + "/a.jpg", headers={"User-Agent": "Mozilla/5.0 img2dataset"})
            assert opener(proxy).open(request, timeout=10).read() == IMAGE
        assert site.hits[0].headers["User-Agent"] == "cnclip/9 (+https://example.org/contact)"


def test_an_image_host_asking_for_a_huge_crawl_delay_is_refused_not_queued():
    robots = (200, {"Content-Type": "text/plain"}, b"User-agent: *\nCrawl-delay: 3600\n")
    routes = {"/robots.txt": robots, "/a.jpg": (200, {}, IMAGE)}
    with RouteServer(routes) as site, GuardProxy(config(obey_robots_for_images=True, max_crawl_delay=30)) as proxy:
        refused = error_of(lambda: opener(proxy).open(site.base + "/a.jpg", timeout=10))
        served = site.paths()
    reason = reason_from_error_message(refused)
    assert reason == "politeness:crawl_delay_too_long" and not is_transient(reason)
    assert served == ["/robots.txt"]


def test_a_body_shorter_than_its_content_length_is_a_transient_failure_of_its_own():
    routes = {
        # The server promises 5000 bytes, sends 10 and hangs up (HTTP/1.0: it closes after answering).
        "/short.jpg": (200, {"Content-Type": "image/jpeg", "Content-Length": "5000"}, IMAGE[:10]),
        # A chunked body cut inside its first chunk.
        "/cut.jpg": (200, {"Transfer-Encoding": "chunked", "Content-Length": None}, b"400\r\n" + IMAGE[:20]),
    }
    with RouteServer(routes) as site, GuardProxy(config()) as proxy:
        client = opener(proxy)
        short = error_of(lambda: client.open(site.base + "/short.jpg", timeout=10))
        cut = error_of(lambda: client.open(site.base + "/cut.jpg", timeout=10))
        stats = proxy.stats()
    assert short == "HTTP Error 502: cnclip-guard network:truncated 127.0.0.1"
    assert reason_from_error_message(cut) == "network:truncated"
    assert is_transient("network:truncated")
    assert stats == {"network:truncated": 2}


def test_oversized_or_too_many_headers_are_a_permanent_bad_response():
    routes = {
        "/long.jpg": (200, {"X-Long": "a" * 70_000}, IMAGE),           # one line over http.client's 64 KiB
        "/many.jpg": (200, {f"X-H{i}": "v" for i in range(150)}, IMAGE),  # over its 100 headers
        "/large.jpg": (200, {f"X-H{i}": "b" * 9000 for i in range(9)}, IMAGE),  # 81 KB in 9 lines
        "/fine.jpg": (200, {f"X-H{i}": "c" * 500 for i in range(50)}, IMAGE),
    }
    with RouteServer(routes) as site, GuardProxy(config()) as proxy:
        client = opener(proxy)
        refused = {name: error_of(lambda name=name: client.open(f"{site.base}/{name}.jpg", timeout=10))
                   for name in ("long", "many", "large")}
        assert client.open(site.base + "/fine.jpg", timeout=10).read() == IMAGE
        stats = proxy.stats()
    assert {name: reason_from_error_message(m) for name, m in refused.items()} == dict.fromkeys(
        refused, "network:bad_response")
    assert all(m.startswith("HTTP Error 502: cnclip-guard network:bad_response") for m in refused.values())
    assert not is_transient("network:bad_response")
    assert stats == {"network:bad_response": 3, "ok": 1}


def file_opener(policy):
    """The worker's opener: file:// goes through the guard too, never urllib's own FileHandler."""
    return guarded_opener(policy)


@pytest.fixture
def local_tree(tmp_path):
    """An allowed folder holding a photo and the traps an attacker's URL list would name."""
    allowed, outside = tmp_path / "allowed", tmp_path / "private"
    allowed.mkdir()
    outside.mkdir()
    (allowed / "图片 1.jpg").write_bytes(IMAGE)
    (outside / "secret.jpg").write_bytes(jpeg_bytes(64, (0, 0, 255)))
    (allowed / "link.jpg").symlink_to(outside / "secret.jpg")
    (allowed / "up").symlink_to(outside)
    os.mkfifo(allowed / "fifo.jpg")
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(allowed / "sock.jpg"))
    with open(allowed / "sparse.jpg", "wb") as f:  # 1 GiB that reads as zeros, no disk used
        f.truncate(1 << 30)
    (allowed / "folder.jpg").mkdir()
    yield allowed, outside
    server.close()


def test_file_urls_read_only_regular_files_under_the_allowed_folders(local_tree, tmp_path):
    allowed, outside = local_tree
    cases = {
        "secret": (f"file://{outside}/secret.jpg", "network:local_file_not_allowed"),
        "passwd": ("file:///etc/passwd", "network:local_file_not_allowed"),
        "dotdot": (f"file://{allowed}/../private/secret.jpg", "network:local_file_not_allowed"),
        "symlink": (f"file://{allowed}/link.jpg", "network:local_file_not_allowed"),
        "symlinked_folder": (f"file://{allowed}/up/secret.jpg", "network:local_file_not_allowed"),
        "fifo": (f"file://{allowed}/fifo.jpg", "network:not_regular_file"),
        "socket": (f"file://{allowed}/sock.jpg", "network:not_regular_file"),
        "folder": (f"file://{allowed}/folder.jpg", "network:not_regular_file"),
        "sparse": (f"file://{allowed}/sparse.jpg", "network:too_large"),
        "missing": (f"file://{allowed}/nothing.jpg", "network:local_file_unreadable"),
        "other_host": (f"file://example.org{allowed}/a.jpg", "network:bad_url"),
    }
    with GuardProxy(config(allow_local_files=(str(allowed),))) as proxy:
        client = file_opener(proxy)
        photo = client.open(f"file://{allowed}/%E5%9B%BE%E7%89%87%201.jpg", timeout=10).read()
        localhost = client.open(f"file://localhost{allowed}/%E5%9B%BE%E7%89%87%201.jpg", timeout=10).read()
        got = {name: reason_from_error_message(error_of(lambda url=url: client.open(url, timeout=10)))
               for name, (url, _) in cases.items()}
    assert photo == localhost == IMAGE
    assert got == {name: reason for name, (_, reason) in cases.items()}


def test_file_urls_are_refused_without_allowed_folders_and_devices_even_when_allowed(tmp_path):
    (tmp_path / "a.jpg").write_bytes(IMAGE)
    with GuardProxy(config()) as proxy:
        # urllib's own FileHandler would read files itself, with no cap: the worker's opener has none.
        assert not any(isinstance(h, urllib.request.FileHandler) for h in file_opener(proxy).handlers)
        refused = error_of(lambda: file_opener(proxy).open(f"file://{tmp_path}/a.jpg", timeout=10))
    assert refused == f"HTTP Error 403: cnclip-guard network:local_file_not_allowed {tmp_path}/a.jpg"
    # A careless recipe allowing /dev: an endless device is still no file to read.
    with GuardProxy(config(allow_local_files=("/dev",))) as proxy:
        zero = error_of(lambda: file_opener(proxy).open("file:///dev/zero", timeout=10))
    assert reason_from_error_message(zero) == "network:not_regular_file"


def test_an_endless_regular_file_is_cut_at_the_size_limit(tmp_path, monkeypatch):
    """/proc-like files report size 0 and never end: the read loop itself stops at the limit."""
    from cnclip.corpus.net import local_files

    (tmp_path / "endless.jpg").write_bytes(b"")
    monkeypatch.setattr(local_files, "_read", lambda fd, n: b"\0" * n)
    answer = local_files.read_local_file(f"file://{tmp_path}/endless.jpg", (str(tmp_path),),
                                         max_bytes=3 * 1024 * 1024, timeout=5)
    assert answer.reason == "network:too_large" and answer.body == b""


def test_a_local_file_read_past_the_timeout_is_a_timeout(tmp_path, monkeypatch):
    """A slow disk (network mount) costs the timeout, as a slow server does."""
    from cnclip.corpus.net import local_files

    (tmp_path / "slow.jpg").write_bytes(b"x" * (3 * 1024 * 1024))
    clock = iter(range(0, 1000, 4))  # every look at the clock is 4 s later
    monkeypatch.setattr(local_files, "_clock", lambda: next(clock))
    answer = local_files.read_local_file(f"file://{tmp_path}/slow.jpg", (str(tmp_path),),
                                         max_bytes=10 * 1024 * 1024, timeout=5)
    assert answer.reason == "network:timeout" and answer.body == b""


def test_a_redirect_to_a_file_url_is_not_followed(tmp_path):
    """A web server cannot hand the client a local file, not even one in an allowed folder."""
    (tmp_path / "a.jpg").write_bytes(IMAGE)
    routes = {"/hop.jpg": (302, {"Location": f"file://{tmp_path}/a.jpg"}, b"")}
    with RouteServer(routes) as site, GuardProxy(config(allow_local_files=(str(tmp_path),))) as proxy:
        message = error_of(lambda: file_opener(proxy).open(site.base + "/hop.jpg", timeout=10))
        stats = proxy.stats()
    assert message.startswith("HTTP Error 302: ") and "is not allowed" in message
    assert stats == {"redirect": 1}  # the file was never asked for
