"""Rows routed by host to download lanes, per-host limits across worker processes, and the
attempts table every stage after the download reads."""

import hashlib
import io
import tarfile
import threading
import time

import polars as pl
import pytest
from PIL import Image

from cnclip.corpus.manifests.schemas import ATTEMPTS_SCHEMA
from cnclip.corpus.net.policy import GuardConfig
from cnclip.corpus.pipeline import run_download, run_text
from cnclip.corpus.runtime.layout import BuildLayout
from cnclip.corpus.stages.download_attempts import scan_attempts, write_attempts
from cnclip.corpus.stages.download_lanes import lanes_per_host
from cnclip.corpus.stages.download_routing import route
from loopback_routes import RouteServer, jpeg_bytes


def rows(urls):
    return pl.DataFrame({"uid": range(len(urls)), "url": urls, "caption": ["标题"] * len(urls)})


def test_a_spaced_host_has_one_lane_an_unspaced_one_its_share_of_the_lanes():
    assert lanes_per_host(GuardConfig(per_host_delay=0.1, per_host_concurrency=8), lanes=4) == 1
    assert lanes_per_host(GuardConfig(per_host_delay=0.0, per_host_concurrency=8), lanes=4) == 4
    assert lanes_per_host(GuardConfig(per_host_delay=0.0, per_host_concurrency=2), lanes=4) == 2


def test_routing_keeps_a_host_on_its_lanes_and_numbers_parts_after_the_given_one():
    # The same host spelled in upper case, with a user and a port, is still the same host.
    urls = ([f"http://a.example/{i}.jpg" for i in range(7)] + ["HTTP://User@A.Example:80/x.jpg"]
            + [f"http://b.example/{i}.jpg" for i in range(5)] + ["file:///photos/1.jpg", "file:///photos/2.jpg"])
    routed = route(rows(urls), lanes=3, per_host=1, per_part=2, first_part=10)
    host_of = {u: ("a" if "a.example" in u.lower() else "b" if "b.example" in u else "") for u in urls}
    lanes = routed.with_columns(pl.col("url").replace_strict(host_of).alias("host"))
    per_host = lanes.group_by("host").agg(pl.col("lane").n_unique()).sort("host").rows()
    assert dict(per_host)["a"] == dict(per_host)["b"] == 1
    assert sorted(routed["uid"].to_list()) == list(range(len(urls)))  # every row once
    sizes = routed.group_by("part").len()
    assert sizes["len"].max() <= 2 and sorted(sizes["part"].to_list()) == list(range(10, 10 + sizes.height))
    # A part holds one lane's rows only.
    assert routed.group_by("part").agg(pl.col("lane").n_unique())["lane"].max() == 1
    spread = route(rows(urls), lanes=3, per_host=3, per_part=2, first_part=0)
    a_lanes = spread.filter(pl.col("uid") < 8)["lane"].value_counts()
    assert a_lanes.height == 3 and a_lanes["count"].max() - a_lanes["count"].min() <= 1  # dealt evenly


def result_part(folder, part, results):
    """img2dataset's per-part result file: (uid, key, status, error_message)."""
    n = len(results)
    frame = pl.DataFrame({
        "uid": [r[0] for r in results], "key": [r[1] for r in results], "status": [r[2] for r in results],
        "error_message": [r[3] for r in results], "width": [32] * n, "height": [32] * n,
        "original_width": [64] * n, "original_height": [64] * n,
        "sha256": [f"h{r[0]}" if r[2] == "success" else None for r in results]})
    folder.mkdir(parents=True, exist_ok=True)
    frame.write_parquet(folder / f"{part:05d}.parquet")


def test_the_attempts_table_keeps_each_rows_latest_attempt_with_its_reason(tmp_path):
    download = tmp_path / "download"
    result_part(download, 0, [(1, "000000000", "success", None), (2, "000000001", "failed_to_download",
                              "HTTP Error 503: Service Unavailable"), (3, "000000002", "failed_to_download",
                              "HTTP Error 404: Not Found")])
    result_part(download, 12, [(2, "001200000", "success", None)])  # a --retry-failed round's part
    table = write_attempts(download)
    assert dict(table.schema) == ATTEMPTS_SCHEMA
    assert table.select("uid", "part", "tar", "key", "status", "reason").rows() == [
        (1, 0, "00000.tar", "000000000", "success", None),
        (2, 12, "00012.tar", "001200000", "success", None),
        (3, 0, None, None, "failed_to_download", "download:failed_to_download"),
    ]
    assert scan_attempts(download).collect().equals(table)


@pytest.mark.slow
def test_per_host_limits_hold_across_worker_processes_and_the_table_names_each_image(make_recipe, tmp_path):
    """Two spawned lanes of 8 threads share one host: together they never exceed its concurrency."""
    lock, active, peak = threading.Lock(), [0], [0]
    images = {f"/{i}.jpg": jpeg_bytes(40, (i * 9 % 256, 50, 90)) for i in range(24)}

    def slow(hit):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.05)  # long enough for 16 threads to pile up if nothing held them
        with lock:
            active[0] -= 1
        return 200, {"Content-Type": "image/jpeg"}, images[hit.path]

    with RouteServer({path: slow for path in images}) as site:
        listing = tmp_path / "list.parquet"
        pl.DataFrame({"url": [site.base + p for p in images], "caption": [f"第{i}张测试图片" for i in range(24)]}
                     ).write_parquet(listing)
        recipe = make_recipe([{"name": "m", "kind": "metadata", "path": str(listing)}],
                             download={"processes": 2, "threads": 8, "per_host_concurrency": 2, "per_host_delay": 0,
                                       "samples_per_part": 5})
        run_text(recipe)
        summary = run_download(recipe)
    layout = BuildLayout.of(recipe)
    assert summary["by_status"] == {"success": 24}
    assert peak[0] <= 2
    assert pl.read_parquet(layout.download_input_dir / "plan.parquet")["lane"].n_unique() == 2
    table = pl.read_parquet(layout.download_dir / "attempts.parquet")
    assert table.height == 24 and table["uid"].is_unique().all()
    urls = pl.read_parquet(layout.text_accepted_dir / "*.parquet").select("uid", "url")
    for tar_name, key, digest, url in table.join(urls, on="uid").select("tar", "key", "sha256", "url").iter_rows():
        assert digest == hashlib.sha256(images[url.removeprefix(site.base)]).hexdigest()  # of the bytes fetched
        with tarfile.open(layout.download_dir / tar_name) as tar:
            member = Image.open(io.BytesIO(tar.extractfile(f"{key}.jpg").read()))
        assert member.size == (32, 32)  # the resized image, where the table says it is


def test_a_lane_whose_build_is_gone_exits(monkeypatch):
    """A killed build's lane must not go on writing the parts its resumed run writes."""
    from cnclip.corpus.stages import download_lanes

    exited = threading.Event()
    monkeypatch.setattr(download_lanes.os, "getppid", lambda: 1)  # reparented: the build is gone
    monkeypatch.setattr(download_lanes.os, "_exit", lambda code: exited.set())
    download_lanes._exit_with_parent(parent=4242)
    assert exited.wait(10)
