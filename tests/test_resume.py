"""kill -9 in the middle of the download and of the shard stage, rerun, compare with a clean build."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest
import yaml

from cnclip.corpus.sources.sample_web import SampleWebServer, draw_shape

pytestmark = pytest.mark.slow
IMAGES = 120


class SlowSampleWeb(SampleWebServer):
    """The sample web, pausing `delay` seconds before it handles each request (one per
    connection: http.server answers HTTP/1.0)."""

    def __init__(self, root: Path, delay: float):
        super().__init__(root)
        self.delay = delay

    def finish_request(self, request, client_address) -> None:
        self.stopping.wait(timeout=self.delay)
        super().finish_request(request, client_address)


@pytest.fixture(scope="module")
def slow_site(tmp_path_factory):
    import random

    root = tmp_path_factory.mktemp("slow-site")
    rng = random.Random(0)
    for i in range(IMAGES):
        draw_shape((rng.randrange(256), rng.randrange(256), rng.randrange(256)), "圆形", rng).save(root / f"{i}.jpg")
    # 30 ms per answer: slow enough to interrupt the download in its middle.
    with SlowSampleWeb(root, delay=0.03) as server:
        rows = [(f"{server.base_url}/{i}.jpg", f"第{i}张彩色圆形图片") for i in range(IMAGES)]
        rows += [(f"{server.base_url}/missing-{i}.jpg", f"一张不存在的图片{i}") for i in range(5)]
        listing = root.parent / "listing.parquet"
        pl.DataFrame(rows, schema=["url", "caption"], orient="row").write_parquet(listing)
        yield listing


def write_recipe(folder: Path, listing: Path) -> Path:
    recipe = {
        "name": "resume",
        "output_dir": str(folder / "out"),
        "manifest_dir": str(folder / "manifests"),
        "sources": [{"name": "site", "kind": "metadata", "path": str(listing)}],
        "image": {"size": 32, "min_side": 16},
        "download": {"processes": 1, "threads": 2, "timeout": 5, "retries": 0, "samples_per_part": 20,
                     "allow_networks": ["127.0.0.1/32"], "per_host_delay": 0},
        "dedup": {"processes": 1},
        # One sample per shard: the shard stage lasts long enough to be killed in its middle.
        "shard": {"samples_per_shard": 1, "processes": 1},
        "text": {"processes": 1},
    }
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, allow_unicode=True), encoding="utf-8")
    return path


def start_build(recipe: Path) -> subprocess.Popen:
    env = {**os.environ, "CNCLIP_QUIET": "1", "NO_ALBUMENTATIONS_UPDATE": "1"}
    return subprocess.Popen([sys.executable, "-m", "cnclip.cli", "corpus", "build", str(recipe)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)


def kill_when(process: subprocess.Popen, ready, timeout: float = 120) -> None:
    """kill -9 the build and all its workers as soon as `ready()` holds."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert process.poll() is None, f"build ended before the kill point: {process.stderr.read().decode()}"
        assert time.monotonic() < deadline, "kill point never reached"
        time.sleep(0.01)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def record(folder: Path, stage: str) -> dict:
    path = folder / "out" / "work" / f"{stage}.state.json"
    return json.loads(path.read_text()) if path.exists() else {}


def snapshot(folder: Path) -> dict:
    shards = folder / "out" / "shards"
    manifests = folder / "manifests"
    funnel = json.loads((manifests / "funnel.json").read_text())
    funnel.pop("shards_dir")  # where the build is, not what it holds
    return {
        "tars": {p.name: p.read_bytes() for p in sorted(shards.glob("*.tar"))},
        "sizes": (shards / "sizes.json").read_text(),
        "samples": pl.read_parquet(manifests / "samples" / "*.parquet").sort("uid").rows(),
        "rejected": pl.concat([pl.read_parquet(p) for p in sorted((manifests / "rejected").glob("*.parquet"))],
                              how="diagonal_relaxed").sort("uid").rows(),
        "funnel": funnel,
    }


def test_killed_builds_finish_identical_to_a_clean_build(slow_site, tmp_path):
    crashed = write_recipe(tmp_path / "crashed", slow_site)
    download_dir = tmp_path / "crashed" / "out" / "work" / "download"

    # 1. Killed once at least one download part is complete and before the stage completes.
    process = start_build(crashed)
    kill_when(process, lambda: len(list(download_dir.glob("*_stats.json"))) >= 1)
    assert not record(tmp_path / "crashed", "download").get("complete")
    assert len(list(download_dir.glob("*_stats.json"))) < 7

    # 2. Rerun: killed again once the shard stage has written some shards but not all.
    shards_dir = tmp_path / "crashed" / "out" / "shards"
    process = start_build(crashed)
    kill_when(process, lambda: len(list(shards_dir.glob("*.tar"))) >= 5)
    assert record(tmp_path / "crashed", "download").get("complete")
    assert not record(tmp_path / "crashed", "shard").get("complete")
    assert 5 <= len(list(shards_dir.glob("*.tar"))) < IMAGES

    # 3. Rerun to the end, then a clean build elsewhere for reference.
    for recipe in (crashed, write_recipe(tmp_path / "clean", slow_site)):
        process = start_build(recipe)
        assert process.wait(timeout=300) == 0, process.stderr.read().decode()
    resumed, clean = snapshot(tmp_path / "crashed"), snapshot(tmp_path / "clean")
    assert resumed["funnel"]["samples"] == IMAGES and resumed["funnel"]["rejected"] == 5
    assert resumed == clean
    assert not list((tmp_path / "crashed").rglob(".*.tmp*"))


def test_changed_settings_redo_what_they_invalidate(slow_site, tmp_path):
    recipe_path = write_recipe(tmp_path, slow_site)
    process = start_build(recipe_path)
    assert process.wait(timeout=300) == 0, process.stderr.read().decode()
    before = {stage: record(tmp_path, stage)["fingerprint"] for stage in ("text", "download", "shard")}
    recipe = yaml.safe_load(recipe_path.read_text())
    recipe["shard"]["samples_per_shard"] = 50
    recipe_path.write_text(yaml.safe_dump(recipe, allow_unicode=True))
    process = start_build(recipe_path)
    assert process.wait(timeout=300) == 0, process.stderr.read().decode()
    after = {stage: record(tmp_path, stage)["fingerprint"] for stage in ("text", "download", "shard")}
    assert after["text"] == before["text"] and after["download"] == before["download"]
    assert after["shard"] != before["shard"]
    assert json.loads((tmp_path / "out" / "shards" / "sizes.json").read_text()) == {
        "00000.tar": 50, "00001.tar": 50, "00002.tar": 20}
