"""Download throughput: cnclip's download stage (rows routed to lanes, the network guard inside
each img2dataset worker) vs raw img2dataset, on the same images served on 127.0.0.1.

Both get the same img2dataset arguments (img2dataset_arguments of the bench recipe: 2 processes
x 16 threads, 224 px, webdataset, sha256) and the same input rows; the stage's figure includes
its routing plan and the attempts table. Rounds alternate between the two; medians are printed.
Target: stage time / raw time <= 1.05x.

BENCH_DOWNLOAD_IMAGES (default 15000) and BENCH_DOWNLOAD_ROUNDS (default 3) size a run;
CNCLIP_BENCH_SMALL=1 (bench/sizes.py) makes their defaults 300 and 1.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("CNCLIP_QUIET", "1")

import io
import shutil
import statistics
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import polars as pl
from PIL import Image

from sizes import announce, size

COUNT = int(os.environ.get("BENCH_DOWNLOAD_IMAGES", size(15000, 300)))
ROUNDS = int(os.environ.get("BENCH_DOWNLOAD_ROUNDS", size(3, 1)))
DISTINCT = 200  # image bodies, served under COUNT distinct paths


def image_bodies() -> list[bytes]:
    """Photo-like 320x240 JPEGs (smooth colour fields plus fine noise), about 20 KB each."""
    rng = np.random.default_rng(0)
    bodies = []
    for _ in range(DISTINCT):
        coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((320, 240), Image.BICUBIC)
        fine = Image.fromarray(rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)).resize((320, 240), Image.BICUBIC)
        buffer = io.BytesIO()
        Image.blend(coarse, fine, 0.3).save(buffer, format="JPEG", quality=90)
        bodies.append(buffer.getvalue())
    return bodies


class _Images(BaseHTTPRequestHandler):
    bodies: list[bytes] = []

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        body = self.bodies[int(self.path.strip("/").split(".")[0]) % DISTINCT]
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args) -> None:
        pass


class ImageServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256  # 2 x 16 client threads connect at once

    def __init__(self) -> None:
        _Images.bodies = image_bodies()
        super().__init__(("127.0.0.1", 0), _Images)
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)

    def __enter__(self) -> "ImageServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
        self.server_close()


def bench_recipe(root: Path, port: int):
    from cnclip.corpus.recipe import parse_recipe

    listing = root / "list.parquet"
    pl.DataFrame({"url": [f"http://127.0.0.1:{port}/{i}.jpg" for i in range(COUNT)],
                  "caption": [f"第{i}张测试图片，草地上的小猫" for i in range(COUNT)]}).write_parquet(listing)
    return parse_recipe({
        "name": "bench-download", "output_dir": str(root / "out"), "manifest_dir": str(root / "manifests"),
        "sources": [{"name": "bench", "kind": "metadata", "path": str(listing)}],
        "download": {"processes": 2, "threads": 16, "retries": 0, "samples_per_part": 1000,
                     "allow_networks": ["127.0.0.1/32"], "per_host_delay": 0, "per_host_concurrency": 64},
        "text": {"processes": 1, "max_caption_repeats": None},
    }, "bench")


def raw_img2dataset(recipe, root: Path) -> float:
    """img2dataset.download with the stage's own arguments, on the same rows, no guard."""
    from img2dataset import download

    from cnclip.corpus.stages.download import img2dataset_arguments

    output = root / "raw"
    shutil.rmtree(output, ignore_errors=True)
    arguments = img2dataset_arguments(recipe) | {"url_list": str(root / "list.parquet"), "output_folder": str(output),
                                                  "save_additional_columns": None}
    started = time.perf_counter()
    download(**arguments)
    elapsed = time.perf_counter() - started
    ok = pl.read_parquet(output / "*.parquet").filter(pl.col("status") == "success").height
    assert ok == COUNT, f"raw img2dataset: {ok} of {COUNT} images"
    return elapsed


def download_stage(recipe) -> float:
    from cnclip.corpus.runtime.layout import BuildLayout
    from cnclip.corpus.stages.download import run_download_stage

    layout = BuildLayout.of(recipe)
    for folder in (layout.download_dir, layout.download_input_dir):
        shutil.rmtree(folder, ignore_errors=True)
    started = time.perf_counter()
    summary = run_download_stage(recipe)
    elapsed = time.perf_counter() - started
    assert summary["by_status"] == {"success": COUNT}, summary["by_status"]
    return elapsed


def main() -> None:
    from cnclip.corpus.pipeline import run_text

    with tempfile.TemporaryDirectory() as tmp, ImageServer() as server:
        root = Path(tmp)
        recipe = bench_recipe(root, server.server_address[1])
        assert run_text(recipe)["accepted"] == COUNT
        raw, ours = [], []
        for _ in range(ROUNDS):
            raw.append(raw_img2dataset(recipe, root))
            ours.append(download_stage(recipe))
    raw_s, ours_s = statistics.median(raw), statistics.median(ours)
    announce()
    print(f"{COUNT} images on 127.0.0.1, 2 processes x 16 threads, median of {ROUNDS} rounds")
    print(f"raw img2dataset: {COUNT / raw_s:,.0f} images/s ({', '.join(f'{t:.1f}' for t in raw)} s)")
    print(f"cnclip download stage (guard in each worker): {COUNT / ours_s:,.0f} images/s "
          f"({', '.join(f'{t:.1f}' for t in ours)} s)")
    ratio = ours_s / raw_s
    print(f"ratio: {ratio:.2f}x the raw time (target <= 1.05x: {'met' if ratio <= 1.05 else 'NOT met'})")


if __name__ == "__main__":
    main()
