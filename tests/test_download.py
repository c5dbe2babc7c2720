import hashlib
import json
import os
import resource
import subprocess
import sys
from urllib.parse import quote

import polars as pl
import pytest

from cnclip.corpus import build
from cnclip.corpus.net.uri import to_uri
from cnclip.corpus.pipeline import run_download, run_text
from cnclip.corpus.recipe import RecipeError
from cnclip.corpus.runtime.memory import download_memory, show_bytes, threads_within_budget
from cnclip.corpus.sources.sample_web import png_bomb
from cnclip.corpus.stages.download import img2dataset_arguments
from cnclip.corpus.stages.download_routing import as_sent
from loopback_routes import RouteServer, jpeg_bytes

# Runs img2dataset's own resizer on a bomb in a fresh process, with and without the pixel limit
# the download stage hands to OpenCV, and reports the peak memory of each.
PROBE = r"""
import io, json, os, sys
def status_kib(field):
    # VmHWM (resident peak) starts afresh at exec; ru_maxrss keeps the forking parent's (a test
    # worker's gigabytes), which hid the decode. VmPeak: the address space's peak, touched or not.
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))
if sys.argv[2] == "guarded":
    os.environ["OPENCV_IO_MAX_IMAGE_PIXELS"] = "89478485"
from img2dataset.resizer import Resizer, ResizeMode
resizer = Resizer(image_size=64, resize_mode=ResizeMode.center_crop, resize_only_if_bigger=False,
                  min_image_size=64, max_image_area=89478485.0, max_aspect_ratio=3.0)
before, reserved = status_kib("VmHWM"), status_kib("VmPeak")
with open(sys.argv[1], "rb") as f:
    result = resizer(io.BytesIO(f.read()))
print(json.dumps({"error": result[-1], "grew_mib": (status_kib("VmHWM") - before) / 1024,
                  "reserved_mib": (status_kib("VmPeak") - reserved) / 1024}))
"""


def probe(path, mode):
    out = subprocess.run([sys.executable, "-c", PROBE, str(path), mode], capture_output=True, text=True,
                         env={"NO_ALBUMENTATIONS_UPDATE": "1", "PATH": "/usr/bin:/bin"}, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_decompression_bomb_is_refused_from_its_header(tmp_path):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_bomb(20_000, 20_000))
    assert bomb.stat().st_size < 1_000_000
    guarded = probe(bomb, "guarded")
    assert "CV_IO_MAX_IMAGE_PIXELS" in guarded["error"]
    assert guarded["grew_mib"] < 50 and guarded["reserved_mib"] < 50
    # Without the guard img2dataset decodes all 400M pixels before its own area check.
    unguarded = probe(bomb, "plain")
    assert unguarded["error"] == "image area too large"
    # The decoder allocates the whole picture (~760 MiB) and writes most of it.
    assert unguarded["reserved_mib"] > 300 and unguarded["grew_mib"] > 300


WORST_IMAGE_PROBE = r"""
import io, json, sys
from img2dataset.resizer import Resizer, ResizeMode
resizer = Resizer(image_size=64, resize_mode=ResizeMode.center_crop, resize_only_if_bigger=False,
                  min_image_size=64, max_image_area=89478485.0, max_aspect_ratio=3.0)
with open(sys.argv[1], "rb") as f:
    result = resizer(io.BytesIO(f.read()))
with open("/proc/self/status") as status:  # VmHWM starts at exec; ru_maxrss keeps the parent's peak
    peak = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))
print(json.dumps({"error": result[-1], "peak": peak}))
"""


def test_the_worst_image_a_process_decodes_fits_the_documented_figure(tmp_path):
    """A 16-bit RGBA PNG (img2dataset alpha-mattes it in float64): one worker process, imports
    included, stays within WORKER_BASE_BYTES + pixels × DECODE_BYTES_PER_PIXEL."""
    import cv2
    import numpy as np

    from cnclip.corpus.runtime.memory import DECODE_BYTES_PER_PIXEL, WORKER_BASE_BYTES

    side = 3000
    ok, encoded = cv2.imencode(".png", np.full((side, side, 4), 30_000, np.uint16))
    (tmp_path / "rgba16.png").write_bytes(encoded.tobytes())
    out = subprocess.run([sys.executable, "-c", WORST_IMAGE_PROBE, str(tmp_path / "rgba16.png")],
                         capture_output=True, text=True, timeout=120,
                         env={"NO_ALBUMENTATIONS_UPDATE": "1", "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["error"] is None  # decoded and resized, not refused
    assert result["peak"] <= WORKER_BASE_BYTES + side * side * DECODE_BYTES_PER_PIXEL


def test_recipe_maps_onto_img2dataset(make_recipe, tmp_path):
    recipe = make_recipe([{"name": "m", "kind": "metadata", "path": "x-*.parquet"}],
                         image={"size": 96, "max_pixels": 1000, "max_aspect_ratio": 2.5, "min_side": 20},
                         download={"timeout": 7, "retries": 2, "processes": 3, "threads": 5})
    args = img2dataset_arguments(recipe)
    assert (args["image_size"], args["max_image_area"], args["max_aspect_ratio"], args["min_image_size"]) == (
        96, 1000.0, 2.5, 20)
    assert (args["timeout"], args["retries"], args["processes_count"], args["thread_count"]) == (7, 2, 3, 5)
    assert args["output_format"] == "webdataset" and args["save_additional_columns"] == ["uid"]
    assert args["disallowed_header_directives"] == ["noai", "noimageai", "noindex", "noimageindex"]
    assert args["output_folder"] == str(tmp_path / "out/work/download")


# --- file:// URLs, URLs as browsers send them, the memory budget (builds over 127.0.0.1) ---------



def metadata_recipe(make_recipe, tmp_path, rows, **sections):
    pl.DataFrame(rows, schema=["url", "caption"], orient="row").write_parquet(tmp_path / "list.parquet")
    return make_recipe([{"name": "m", "kind": "metadata", "path": str(tmp_path / "list.parquet")}], **sections)


def manifests(recipe):
    samples = pl.read_parquet(recipe.manifest_dir / "samples" / "*.parquet")
    rejected = pl.concat([pl.read_parquet(p) for p in sorted((recipe.manifest_dir / "rejected").glob("*.parquet"))],
                         how="diagonal_relaxed")
    return samples, rejected


def test_file_urls_are_rejected_before_download_unless_folders_are_allowed(make_recipe, tmp_path):
    secret = tmp_path / "private.jpg"
    secret.write_bytes(jpeg_bytes(64))
    rows = [(f"file://{secret}", "我的私人照片一张"), ("FILE:///etc/passwd", "系统密码文件内容"),
            (" file:/etc/passwd", "另一个密码文件啊")]
    recipe = metadata_recipe(make_recipe, tmp_path, rows)
    assert run_text(recipe) == {"accepted": 0, "rejected": 3}
    rejected = pl.read_parquet(recipe.output_dir / "work/text/rejected/*.parquet")
    assert rejected["reason"].to_list() == ["ingest:local_file_not_allowed"] * 3
    assert rejected["stage"].unique().to_list() == ["ingest"]


def test_allowing_local_files_later_redoes_the_text_stage(make_recipe, tmp_path):
    """The text stage's verdict on file:// depends on a download key: its fingerprint must too."""
    (tmp_path / "photos").mkdir()
    rows = [(f"file://{tmp_path}/photos/a.jpg", "我自己的猫咪照片")]
    assert run_text(metadata_recipe(make_recipe, tmp_path, rows)) == {"accepted": 0, "rejected": 1}
    allowed = metadata_recipe(make_recipe, tmp_path, rows, download={"allow_local_files": [str(tmp_path / "photos")]})
    assert run_text(allowed) == {"accepted": 1, "rejected": 0}
    assert pl.read_parquet(allowed.output_dir / "work/text/accepted/*.parquet")["url"].to_list() == [rows[0][0]]


def test_allow_local_files_must_name_existing_folders(make_recipe, tmp_path):
    (tmp_path / "a-file").write_text("x")
    for bad in (str(tmp_path / "missing"), str(tmp_path / "a-file")):
        with pytest.raises(RecipeError, match=r"test-recipe: download.allow_local_files: .*not an existing folder"):
            make_recipe([{"name": "m", "kind": "metadata", "path": "x.parquet"}],
                        download={"allow_local_files": [bad]})


@pytest.mark.slow
def test_local_files_and_chinese_urls_through_a_real_build(make_recipe, tmp_path):
    """Allowed photos are published; everything else an attacker's list names is rejected with why."""
    allowed, outside = tmp_path / "photos", tmp_path / "private"
    allowed.mkdir()
    outside.mkdir()
    photo, web_image = jpeg_bytes(64, (10, 200, 10)), jpeg_bytes(64, (200, 10, 10))
    (allowed / "猫 1.jpg").write_bytes(photo)
    (outside / "secret.jpg").write_bytes(jpeg_bytes(64, (0, 0, 250)))
    (allowed / "link.jpg").symlink_to(outside / "secret.jpg")
    os.mkfifo(allowed / "fifo.jpg")
    with open(allowed / "huge.jpg", "wb") as f:
        f.truncate(200 << 20)  # sparse: 200 MiB of zeros without the disk space
    path = "/图片/猫 1.jpg"
    with RouteServer({quote(path): (200, {"Content-Type": "image/jpeg"}, web_image)}) as site:
        chinese = f"{site.base}{path}?名字=值 一"
        rows = [
            (chinese, "一只可爱的小猫图片"),
            (f"file://{allowed}/猫 1.jpg", "允许的本地猫照片"),
            (f"file://{outside}/secret.jpg", "别人的私人照片啊"),
            ("file:///etc/passwd", "系统密码文件内容"),
            (f"file://{allowed}/link.jpg", "指向外面的链接啊"),
            (f"file://{allowed}/fifo.jpg", "命名管道不会结束"),
            (f"file://{allowed}/huge.jpg", "无穷无尽的大文件"),
        ]
        recipe = metadata_recipe(make_recipe, tmp_path, rows,
                                 download={"allow_local_files": [str(allowed)], "max_response_bytes": 1 << 20})
        build(recipe, show_funnel=False)
        served = site.paths()
    samples, rejected = manifests(recipe)
    # The manifest keeps the URLs as given; the server saw them as a browser sends them.
    assert sorted(samples["url"].to_list()) == sorted([chinese, f"file://{allowed}/猫 1.jpg"])
    assert served == [to_uri(chinese).split(str(site.port), 1)[1]]
    assert served == ["/%E5%9B%BE%E7%89%87/%E7%8C%AB%201.jpg?%E5%90%8D%E5%AD%97=%E5%80%BC%20%E4%B8%80"]
    by_url = {r["url"]: r["sha256"] for r in samples.iter_rows(named=True)}
    assert by_url[chinese] == hashlib.sha256(web_image).hexdigest()
    assert by_url[f"file://{allowed}/猫 1.jpg"] == hashlib.sha256(photo).hexdigest()
    assert dict(rejected.select("caption_raw", "reason").iter_rows()) == {
        "别人的私人照片啊": "network:local_file_not_allowed",
        "系统密码文件内容": "network:local_file_not_allowed",
        "指向外面的链接啊": "network:local_file_not_allowed",
        "命名管道不会结束": "network:not_regular_file",
        "无穷无尽的大文件": "network:too_large",
    }


def test_urls_are_encoded_as_browsers_send_them_by_the_html_sources_function():
    frame = pl.LazyFrame({"uid": [3, 1, 2, 4], "url": [
        "http://例子.中国/图片.jpg?名字=值", "http://a.example/x%20y.jpg", "http://a.example/猫 1.jpg#片段",
        "http://" + "长" * 70 + ".中国/a.jpg"]})
    sent = as_sent(frame).collect()
    assert sent["uid"].to_list() == [1, 2, 3, 4]
    assert sent["url"].to_list() == [
        "http://a.example/x%20y.jpg",  # already encoded: unchanged, not encoded twice
        "http://a.example/%E7%8C%AB%201.jpg#%E7%89%87%E6%AE%B5",
        "http://xn--fsqu00a.xn--fiqs8s/%E5%9B%BE%E7%89%87.jpg?%E5%90%8D%E5%AD%97=%E5%80%BC",
        "http://" + "长" * 70 + ".中国/a.jpg",  # a label IDNA cannot encode: left for img2dataset to fail
    ]


def test_memory_budget_lowers_threads_or_refuses(make_recipe):
    per_thread = download_memory(2, 2, 1_000_000, 1 << 20) - download_memory(2, 1, 1_000_000, 1 << 20)
    one = download_memory(2, 1, 1_000_000, 1 << 20)
    assert threads_within_budget(2, 16, 1_000_000, 1 << 20, None) == (16, None)
    assert threads_within_budget(2, 16, 1_000_000, 1 << 20, one + 3 * per_thread)[0] == 4
    assert threads_within_budget(2, 16, 1_000_000, 1 << 20, one + 4 * per_thread - 1)[0] == 4
    assert threads_within_budget(2, 3, 1_000_000, 1 << 20, 10 * one) == (3, None)
    # More pixels per image cost more: the figure grows with image.max_pixels.
    assert download_memory(1, 1, 2_000_000, 1) > download_memory(1, 1, 1_000_000, 1)
    with pytest.raises(RecipeError, match=r"download.memory_budget 1.0 GiB is below what 2 process\(es\) of one "
                                          r"thread need: 16.3 GiB"):
        make_recipe([{"name": "m", "kind": "metadata", "path": "x.parquet"}],
                    download={"processes": 2, "memory_budget": "1GiB"}, image={"max_pixels": 89_478_485})


@pytest.mark.slow
def test_huge_jpegs_download_within_the_memory_figure(make_recipe, tmp_path, monkeypatch):
    """9000×9000 JPEGs (flat colour: about 1 MB each): threads lowered to fit the budget, and no
    worker process grew past its share of the documented figure."""
    import io

    from PIL import Image

    images = {}
    for i, color in enumerate([(200, 40, 40), (40, 200, 40), (40, 40, 200)]):
        buffer = io.BytesIO()
        Image.new("RGB", (9000, 9000), color).save(buffer, format="JPEG", quality=10)
        images[f"/{i}.jpg"] = (200, {"Content-Type": "image/jpeg"}, buffer.getvalue())
    max_pixels, max_bytes = 81_000_000, 2 << 20
    budget = download_memory(1, 2, max_pixels, max_bytes)
    with RouteServer(images) as site:
        rows = [(f"{site.base}/{i}.jpg", f"第{i}张纯色大图片") for i in range(3)]
        recipe = metadata_recipe(make_recipe, tmp_path, rows, image={"max_pixels": max_pixels, "size": 32},
                                 download={"threads": 8, "processes": 1, "max_response_bytes": max_bytes,
                                           "memory_budget": budget})
        assert img2dataset_arguments(recipe)["thread_count"] == 2
        said = []
        monkeypatch.setattr("cnclip.corpus.stages.download.info", said.append)
        run_text(recipe)
        summary = run_download(recipe)
    assert summary["by_status"] == {"success": 3}
    assert [m for m in said if "memory_budget" in m] == [
        f"download: 8 threads per process would need {show_bytes(download_memory(1, 8, max_pixels, max_bytes))}, "
        f"over download.memory_budget {show_bytes(budget)}; running 2 threads ({show_bytes(budget)})"]
    # The largest child (img2dataset's worker) stayed under one process's share of the figure.
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    assert peak <= budget
