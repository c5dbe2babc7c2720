"""pHash throughput on one core: cnclip's hash stage vs imagehash.phash(Image.open(path)).

Same 256 px JPEG files for both, decoding included. Target: >= 3x.
CNCLIP_BENCH_SMALL=1 (bench/sizes.py): 200 images.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import tempfile
import time
from pathlib import Path

import imagehash
import numpy as np
from PIL import Image

from cnclip.corpus.ops.phash import from_hex, hamming, phash_bytes
from sizes import announce, size

COUNT = size(2000, 200)


def make_jpegs(folder: Path) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    for i in range(COUNT):
        coarse = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize((256, 256), Image.BICUBIC)
        fine = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).resize((256, 256), Image.BICUBIC)
        path = folder / f"{i:05d}.jpg"
        Image.blend(coarse, fine, 0.3).save(path, quality=90)
        paths.append(path)
    return paths


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_jpegs(Path(tmp))
        for path in paths:  # warm the page cache for both contenders
            path.read_bytes()
        started = time.perf_counter()
        reference = [str(imagehash.phash(Image.open(path))) for path in paths]
        baseline = time.perf_counter() - started
        started = time.perf_counter()
        ours = phash_bytes(path.read_bytes() for path in paths)
        elapsed = time.perf_counter() - started
    distances = hamming(ours, from_hex(reference))
    announce()
    print(f"imagehash.phash(Image.open(path)), 1 core: {COUNT / baseline:,.0f} images/s")
    print(f"cnclip hash stage (draft decode + batched DCT), 1 core: {COUNT / elapsed:,.0f} images/s")
    print(f"ratio: {baseline / elapsed:.2f}x (target >= 3x: {'met' if baseline / elapsed >= 3 else 'NOT met'})")
    print(f"Hamming distance to imagehash: mean {distances.mean():.2f}, max {distances.max()}, "
          f"identical {np.mean(distances == 0):.0%}")


if __name__ == "__main__":
    main()
