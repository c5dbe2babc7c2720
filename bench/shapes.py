"""Training shards for bench_train.py: coloured shapes with Chinese captions, as WebDataset tars.

The benchmark makes its own data instead of importing the test suite's helpers, so it runs
without pytest or the tests' fixtures. The pictures are the sample web's; the samples and tar
layout match what the training tests write (the same seed gives the same images and captions).
Not named bench_*.py: `make bench` runs every such file.
"""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import webdataset as wds

from cnclip.corpus.sources.sample_web import COLORS, SHAPES, draw_shape

# Captions in the sample web's style: the colour and the shape are what a model can learn.
TEMPLATES = ["一个{c}的{s}", "画着{c}{s}的图片", "浅色背景上的{c}{s}", "这是一个{c}{s}"]


def shape_samples(count: int, seed: int, side: int = 64) -> list[tuple[bytes, str]]:
    """(jpg bytes, caption) for random coloured shapes: 6 colours × 4 shapes."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        color, shape = COLORS[rng.randrange(len(COLORS))], SHAPES[rng.randrange(len(SHAPES))][0]
        buffer = io.BytesIO()
        draw_shape(color[2], shape, rng, side=side).save(buffer, format="JPEG", quality=90)
        out.append((buffer.getvalue(), rng.choice(TEMPLATES).format(c=color[0], s=shape)))
    return out


def write_shards(folder: Path, samples: list[tuple[bytes, str]], per_shard: int) -> list[str]:
    """Tars like the corpus build's ({key}.jpg, {key}.txt, {key}.json) plus sizes.json."""
    folder.mkdir(parents=True, exist_ok=True)
    paths, sizes = [], {}
    for start in range(0, len(samples), per_shard):
        shard = start // per_shard
        path = folder / f"{shard:05d}.tar"
        chunk = samples[start:start + per_shard]
        with wds.TarWriter(str(path)) as writer:
            for i, (jpg, caption) in enumerate(chunk):
                writer.write({"__key__": f"{shard:05d}{i:04d}", "jpg": jpg, "txt": caption,
                              "json": json.dumps({"caption": caption}, ensure_ascii=False)})
        sizes[path.name] = len(chunk)
        paths.append(str(path))
    (folder / "sizes.json").write_text(json.dumps(sizes))
    return paths
