"""The download's routing and attempts table on the Spark engine: every step that touches rows is
an engine task or query, so the driver reads none (spark_driver.py), and the routing is the
local engine's: the same lanes and parts for the same rows."""

import polars as pl
import pytest

from cnclip.corpus.pipeline import run_text
from cnclip.corpus.runtime.layout import BuildLayout
from cnclip.corpus.stages.download import retry_failed, run_download_stage
from cnclip.corpus.stages.download_routing import as_sent, route
from loopback_routes import RouteServer, jpeg_bytes
from spark_driver import Recording, driver_reads_no_rows
from spark_session import spark  # noqa: F401 (the session fixture)

pytestmark = [pytest.mark.spark]

def test_routing_and_attempts_run_as_engine_steps_and_route_as_the_local_engine(spark, make_recipe, tmp_path):
    images = {f"/{i}.jpg": jpeg_bytes(40, (i * 19 % 256, 60, 90)) for i in range(12)}
    calls = {"busy": 0}

    def busy_then_ok(hit):
        calls["busy"] += 1
        return (429, {"Retry-After": "1"}, b"slow down") if calls["busy"] == 1 else (
            200, {"Content-Type": "image/jpeg"}, jpeg_bytes(40, (5, 200, 5)))

    with RouteServer({**{p: (200, {"Content-Type": "image/jpeg"}, b) for p, b in images.items()},
                      "/busy.jpg": busy_then_ok}) as site:
        urls = [site.base + p for p in images] + [f"{site.base}/busy.jpg"]
        pl.DataFrame({"url": urls, "caption": [f"第{i}张测试用的图片" for i in range(len(urls))]}
                     ).write_parquet(tmp_path / "list.parquet")
        recipe = make_recipe([{"name": "m", "kind": "metadata", "path": str(tmp_path / "list.parquet")}],
                             download={"processes": 2, "per_host_concurrency": 2, "samples_per_part": 3})
        run_text(recipe)
        engine = Recording(spark)
        with pytest.MonkeyPatch.context() as patch:
            driver_reads_no_rows(patch)
            first = run_download_stage(recipe, engine)
            again = retry_failed(recipe, first, engine)
    layout = BuildLayout.of(recipe)
    assert first["by_status"] == {"failed_to_download": 1, "success": 12}
    assert again["retried"] == 1 and again["by_status"] == {"success": 13}
    # One task per accepted part, per img2dataset part, per lane; in both rounds.
    plan = pl.read_parquet(layout.download_input_dir / "plan.parquet")
    parts = plan["part"].n_unique()
    assert engine.maps["download: rows as sent"] == [1, 1]
    assert engine.maps["download: part inputs"] == [parts, 1]
    assert engine.maps["download: lanes"] == [2, 1]
    assert engine.maps["download: attempts per part"] == [parts, parts + 1]
    # What came back to the driver: a row per lane, per part or per status, never one per row.
    assert 0 < max(engine.returned) <= parts < len(urls)
    # The routing is the local engine's function of the rows (a host's rows over its two lanes).
    accepted = pl.read_parquet(layout.text_accepted_dir / "*.parquet").select("uid", "url", "caption")
    expected = route(as_sent(accepted.lazy()).collect(), lanes=2, per_host=2, per_part=3, first_part=0)
    assert plan.equals(expected.select("uid", "lane", "part"))
    assert plan["lane"].n_unique() == 2
    attempts = pl.read_parquet(layout.download_dir / "attempts.parquet")
    assert attempts["uid"].sort().to_list() == accepted["uid"].sort().to_list()
    busy = attempts.join(accepted.filter(pl.col("url").str.ends_with("/busy.jpg")), on="uid")
    assert busy.select("status", "part").rows() == [("success", plan["part"].max() + 1)]
