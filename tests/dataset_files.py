"""Small files in the published datasets' formats, made by the tests: COCO captions JSON, Visual
Genome region descriptions, Chinese-CLIP's TSV (base64 images) + JSONL. Each image is a
textured square of its own base colour, so a shard's image can be traced back to its source by
its mean colour, and no two images are near-duplicates by pHash."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
from PIL import Image


def textured(seed: int, size: int = 64) -> Image.Image:
    """A square of random 8x8-pixel blocks around a base colour (seeded)."""
    rng = np.random.default_rng(seed)
    base = rng.integers(40, 216, size=3)
    blocks = rng.integers(-40, 40, size=(8, 8, 3))
    pixels = np.clip(base + np.kron(blocks, np.ones((size // 8, size // 8, 1))), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, "RGB")


def jpeg_bytes(seed: int) -> bytes:
    buffer = io.BytesIO()
    textured(seed).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def mean_colour(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float64).mean(axis=(0, 1))


def write_coco(root: Path, seeds: dict[int, int], captions: list[tuple[int, object]], missing: tuple[int, ...] = ()
               ) -> Path:
    """images/ with one JPEG per image id (except `missing`, listed but absent) and captions.json."""
    folder = root / "images"
    folder.mkdir(parents=True, exist_ok=True)
    images = []
    for image_id, seed in seeds.items():
        name = f"COCO_val2014_{image_id:012d}.jpg"
        if image_id not in missing:
            (folder / name).write_bytes(jpeg_bytes(seed))
        images.append({"id": image_id, "file_name": name, "coco_url": f"http://127.0.0.1:9/{name}",
                       "height": 64, "width": 64})
    annotations = [{"id": 100 + i, "image_id": image_id, "caption": caption}
                   for i, (image_id, caption) in enumerate(captions)]
    path = root / "captions.json"
    path.write_text(json.dumps({"info": {}, "images": images, "annotations": annotations}, ensure_ascii=False),
                    encoding="utf-8")
    return path


def write_visual_genome(root: Path, seeds: dict[int, int], regions: dict[int, list[str]]) -> Path:
    """VG_100K/{id}.jpg and region_descriptions.json (ids in `regions` order)."""
    folder = root / "vg" / "VG_100K"
    folder.mkdir(parents=True, exist_ok=True)
    for image_id, seed in seeds.items():
        (folder / f"{image_id}.jpg").write_bytes(jpeg_bytes(seed))
    described = [{"id": image_id, "regions": [{"region_id": image_id * 10 + i, "image_id": image_id, "phrase": p,
                                               "x": 0, "y": 0, "width": 8, "height": 8}
                                              for i, p in enumerate(phrases)]}
                 for image_id, phrases in regions.items()]
    path = root / "vg" / "region_descriptions.json"
    path.write_text(json.dumps(described, ensure_ascii=False), encoding="utf-8")
    return path


def write_cn_clip(folder: Path, split: str, tsv_lines: list[str], texts: list[object]) -> Path:
    """{split}_imgs.tsv and {split}_texts.jsonl, lines as given (a text that is a str is written raw)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{split}_imgs.tsv").write_text("".join(f"{line}\n" for line in tsv_lines), encoding="utf-8")
    lines = [t if isinstance(t, str) else json.dumps(t, ensure_ascii=False) for t in texts]
    (folder / f"{split}_texts.jsonl").write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
    return folder


def tsv_line(image_id: int, seed: int, urlsafe: bool = False) -> str:
    data = jpeg_bytes(seed)
    encoded = base64.urlsafe_b64encode(data) if urlsafe else base64.b64encode(data)
    return f"{image_id}\t{encoded.decode('ascii')}"
