"""The browser harness reports what a page does wrong: a check of the checker, so a report or
search test that finds no problem found none because there was none."""

import base64
import io

import pytest
from PIL import Image

from browser import rendered

pytestmark = pytest.mark.browser


def _png(color) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_a_clean_page_has_no_problems_and_its_pixels_are_drawn(browser, tmp_path):
    page = tmp_path / "ok.html"
    page.write_text(f'<html><body style="margin:0;background:#fff"><h1>你好</h1>'
                    f'<img id="i" width="64" height="64" src="data:image/png;base64,{_png((255, 0, 0))}"></body></html>',
                    encoding="utf-8")
    seen = rendered(browser, page, tmp_path / "out")
    assert seen.problems == []
    assert "你好" in seen.dom and (tmp_path / "out" / "page.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    shot = Image.open(io.BytesIO(seen.screenshot)).convert("RGB")
    box = seen.page.eval_on_selector("#i", "i => { const r = i.getBoundingClientRect(); return [r.x, r.y]; }")
    assert shot.getpixel((int(box[0]) + 32, int(box[1]) + 32)) == (255, 0, 0)
    seen.page.close()


def test_errors_broken_images_and_outside_requests_are_reported(browser, tmp_path):
    page = tmp_path / "bad.html"
    page.write_text('<html><body><img src="missing.png"><img src="http://example.invalid/x.png">'
                    '<script>console.error("boom"); undefinedFunction();</script></body></html>', encoding="utf-8")
    seen = rendered(browser, page)
    assert any("boom" in e for e in seen.console_errors)
    assert any("undefinedFunction" in e for e in seen.console_errors)
    assert seen.outside_requests == ["http://example.invalid/x.png"]
    assert len(seen.broken_images) == 2
    seen.page.close()
