"""`cnclip search --serve`: the page in headless Chromium, and the server's routes."""

import json
import threading
import urllib.error
import urllib.request

import pytest

from browser import open_page, snapshot
from cnclip.search import Searcher
from cnclip.search.serve import make_server
from cnclip.search.shards import ShardMembers

# The first test builds the demo corpus and trains on it (minutes on 2 shared cores).
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

QUERY = "一个红色的圆形"


@pytest.fixture(scope="module")
def server(searchable_corpus):
    corpus = searchable_corpus
    running = make_server(Searcher.open(corpus, device="cpu"), 0)
    thread = threading.Thread(target=running.serve_forever, daemon=True)
    thread.start()
    yield running
    running.shutdown()
    running.server_close()


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=30) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


@pytest.mark.browser
def test_the_page_shows_the_hits_images_and_asks_nothing_outside(server, browser, tmp_path):  # noqa: F811
    expected = server.searcher.search(text=QUERY, top=10)
    page, seen = open_page(browser, server.url)
    page.fill("#q", QUERY)
    page.click("button[type=submit]")
    page.wait_for_selector("figure.hit")
    page.wait_for_function("() => [...document.images].every(i => i.complete)")  # loaded or failed, not pending
    seen = snapshot(page, seen, tmp_path / "out")
    keys = page.eval_on_selector_all("figure.hit", "figs => figs.map(f => f.dataset.key)")
    loaded = page.eval_on_selector_all("figure.hit img", "imgs => imgs.map(i => i.complete && i.naturalWidth > 0)")
    # Captions as text: one such as "画着红色正方形的图片 <高清>" is shown, never parsed as markup.
    captions = page.eval_on_selector_all("figure.hit figcaption", "cs => cs.map(c => c.firstChild.textContent)")
    page.close()
    assert keys == [h["key"] for h in expected]
    assert loaded == [True] * 10
    assert seen.problems == []  # no console error, no failed or outside request, no broken image
    assert captions == [h["caption"] for h in expected]


def test_an_image_route_serves_the_shards_member_bytes(server):
    hit = server.searcher.search(text=QUERY, top=1)[0]
    status, body = _get(f"{server.url}image/{hit['shard']}/{hit['key']}")
    assert status == 200
    assert body == ShardMembers(server.searcher.manifest_dir).image(hit["shard"], hit["key"])[1]


@pytest.mark.parametrize("path", ["image/0/9999999", "image/7/0000000", "image/x/0000000",
                                  "image/0/..%2F..%2Ffunnel.json", "image/0", "nothing"])
def test_what_is_not_a_samples_image_is_not_found(server, path):
    status, _ = _get(server.url + path)
    assert status == 404


def test_the_api_answers_json_and_one_line_errors(server):
    status, body = _get(f"{server.url}api/search?q=%E7%BA%A2%E8%89%B2&top=3")
    answer = json.loads(body)
    assert status == 200 and answer["query"] == "红色" and len(answer["hits"]) == 3
    assert all(h["image"] == f"/image/{h['shard']}/{h['key']}" for h in answer["hits"])
    for query, message in [("q=&top=3", "the text query is empty"), ("q=x&top=zero", "top: not a number"),
                           ("q=x&top=0", "--top 0: must be at least 1")]:
        status, body = _get(f"{server.url}api/search?{query}")
        assert (status, json.loads(body)["error"]) == (400, message)


def test_it_listens_on_loopback_only(server):
    assert server.server_address[0] == "127.0.0.1"
