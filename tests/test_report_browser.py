"""Both reports rendered by headless Chromium (tests/browser.py): the corpus report the demo
build wrote and the report of a short run trained on that corpus, each checked as a reader sees
it: the funnel numbers in the DOM are funnel.json's, every reason present has an example, every
image loads and shows the shard's pixels, no console error, nothing fetched from outside."""

from __future__ import annotations

import io
import json
import tarfile

import pytest
from PIL import Image
from typer.testing import CliRunner

from browser import rendered
from cnclip.cli import app
from cnclip.train.runlog import read_log
from search_corpus import STAGE1_STEPS

pytestmark = [pytest.mark.browser, pytest.mark.slow]


@pytest.fixture(scope="module")
def demo_run(searchable_corpus):
    """The shared two-stage run on the demo corpus (search_corpus.py), its report written by the command."""
    run = searchable_corpus.parent / "run"
    result = CliRunner().invoke(app, ["train", "report", str(run), "--out", str(run / "report.html")])
    assert result.exit_code == 0, result.output
    return run


def _flat_point(image: Image.Image) -> tuple[int, int]:
    """The pixel nearest the centre whose 5x5 neighbourhood is one colour (not a shape's edge,
    where the browser's scaling blends neighbours)."""
    w, h = image.size
    spread = lambda x, y: max(max(c) - min(c) for c in zip(*(image.getpixel((x + i, y + j))  # noqa: E731
                                                               for i in range(-2, 3) for j in range(-2, 3)), strict=True))
    candidates = sorted(((x, y) for x in range(4, w - 4, 2) for y in range(4, h - 4, 2)),
                        key=lambda p: (p[0] - w / 2) ** 2 + (p[1] - h / 2) ** 2)
    return min(candidates[:200], key=lambda p: spread(*p))


def test_the_built_corpus_report_renders_with_the_funnels_numbers(browser, demo_corpus, tmp_path):
    manifests = demo_corpus / "manifests"
    report = manifests / "report.html"
    assert report.is_file()  # written by the build itself
    funnel = json.loads((manifests / "funnel.json").read_text(encoding="utf-8"))
    seen = rendered(browser, report, tmp_path / "corpus")
    page = seen.page
    try:
        assert seen.problems == []
        assert seen.broken_images == [] and seen.outside_requests == []
        number = lambda handle: int(handle.inner_text().replace(",", ""))  # noqa: E731
        for stage in funnel["stages"]:
            row = page.query_selector(f'#funnel-table tr[data-stage="{stage["stage"]}"]')
            assert (number(row.query_selector("[data-in]")), number(row.query_selector("[data-out]"))) == \
                (stage["in"], stage["out"])
        shown = {row.get_attribute("data-reason"): number(row.query_selector("[data-count]"))
                 for row in page.query_selector_all("#funnel-table tr[data-reason]")}
        assert shown == funnel["rejected_by_reason"]
        totals = {e.get_attribute("data-total"): number(e) for e in page.query_selector_all("[data-total]")}
        assert totals == {k: funnel[k] for k in ("input_rows", "samples", "rejected")}
        for reason in funnel["rejected_by_reason"]:
            assert page.query_selector(f'[data-example="{reason}"]') is not None, reason
        # each duplicate example shows two loaded images: its own and the kept one
        for example in page.query_selector_all('[data-example^="dedup:"]'):
            assert len(example.query_selector_all("img")) == 2
    finally:
        page.close()


def test_a_thumbnails_centre_is_the_shard_images_centre_colour(browser, demo_corpus, tmp_path):
    seen = rendered(browser, demo_corpus / "manifests" / "report.html")
    page = seen.page
    try:
        shot = Image.open(io.BytesIO(page.screenshot(full_page=True))).convert("RGB")
        tiles = page.query_selector_all("#samples img[data-key]")
        assert len(tiles) >= 10
        for tile in tiles[:5]:
            key = tile.get_attribute("data-key")
            with tarfile.open(demo_corpus / "data" / "shards" / f"{key[:5]}.tar") as tar:
                stored = Image.open(io.BytesIO(tar.extractfile(f"{key}.jpg").read())).convert("RGB")
            u, v = _flat_point(stored)
            expected = stored.getpixel((u, v))
            box = tile.bounding_box()  # object-fit: contain centres the scaled image in the box
            side = min(box["width"] / stored.width, box["height"] / stored.height)
            left = box["x"] + (box["width"] - side * stored.width) / 2
            top = box["y"] + page.evaluate("window.scrollY") + (box["height"] - side * stored.height) / 2
            got = shot.getpixel((int(left + (u + 0.5) * side), int(top + (v + 0.5) * side)))
            assert max(abs(a - b) for a, b in zip(got, expected, strict=True)) <= 12, (key, (u, v), got, expected)
    finally:
        page.close()


def test_the_run_report_renders_its_curves_and_last_evaluation(browser, demo_run, tmp_path):
    seen = rendered(browser, demo_run / "report.html", tmp_path / "run")
    page = seen.page
    try:
        assert seen.problems == []
        assert len(page.query_selector_all("#training svg")) == 5  # loss, lr, scale, throughput, data wait
        assert len(page.query_selector_all("#evaluation svg")) == 1
        marks = page.eval_on_selector_all("#training svg text", "ts => ts.map(t => t.textContent)")
        assert marks.count("stage 2") >= 5  # the stage switch on every training curve
        last = read_log(demo_run, "eval")[-1]
        cells = page.eval_on_selector_all("#eval-table tbody td", "tds => tds.map(t => t.textContent)")
        header = page.eval_on_selector_all("#eval-table thead th", "ths => ths.map(t => t.textContent)")
        assert cells[:3] == [last["set"], str(last["stage"]), str(last["step"])]
        assert float(cells[header.index("mean_recall")].replace(",", "")) == pytest.approx(last["mean_recall"],
                                                                                            rel=1e-3)
        config = page.inner_text("#config pre")
        assert json.loads(config)["stage1"]["steps"] == STAGE1_STEPS
    finally:
        page.close()
