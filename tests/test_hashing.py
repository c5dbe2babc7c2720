import io

import imagehash
import numpy as np
import polars as pl
import pytest
from PIL import Image

from cnclip.corpus.ops.phash import (
    DRAFT_MAX_DISTANCE,
    from_hex,
    gray32,
    hamming,
    hex_digits,
    phash_bytes,
    phash_pixels,
    to_hex,
)


def textured(seed: int, side: int = 256) -> Image.Image:
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (5, 5, 3), dtype=np.uint8)).resize((side, side), Image.BICUBIC)
    fine = Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).resize((side, side), Image.BICUBIC)
    return Image.blend(coarse, fine, 0.3)


def encode(image: Image.Image, fmt: str = "JPEG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buffer.getvalue()


@pytest.fixture(scope="module")
def jpegs():
    return [encode(textured(seed)) for seed in range(300)]


def test_equal_to_imagehash_on_the_same_pixels(jpegs):
    reference = [str(imagehash.phash(Image.open(io.BytesIO(data)))) for data in jpegs]
    pixels = np.stack([gray32(data, draft=False) for data in jpegs])
    assert to_hex(phash_pixels(pixels)) == reference
    assert to_hex(phash_bytes(jpegs, draft=False)) == reference


def test_draft_decoding_moves_hashes_by_a_few_bits_at_most(jpegs):
    reference = from_hex(str(imagehash.phash(Image.open(io.BytesIO(data)))) for data in jpegs)
    distances = hamming(phash_bytes(jpegs), reference)
    assert distances.max() <= DRAFT_MAX_DISTANCE
    assert distances.mean() < 1.0
    assert (distances == 0).mean() > 0.5


def test_non_jpeg_is_decoded_fully():
    pngs = [encode(textured(seed, 96), "PNG") for seed in range(20)]
    assert to_hex(phash_bytes(pngs)) == [str(imagehash.phash(Image.open(io.BytesIO(p)))) for p in pngs]


def test_hex_forms_agree():
    values = np.array([0, 1, 0x8000000000000000, 0x0123456789ABCDEF, 2**64 - 1], dtype=np.uint64)
    expected = [f"{int(v):016x}" for v in values]
    assert to_hex(values) == expected
    assert pl.select(hex_digits(pl.lit(pl.Series(values, dtype=pl.UInt64)))).to_series().to_list() == expected
    assert (from_hex(expected) == values).all()


def test_scaled_decoding_matches_pil_draft_mode_for_every_size():
    from cnclip.corpus.ops.phash import DRAFT_SIDE, SAMPLE_SIDE, jpeg_size

    rng = np.random.default_rng(1)
    for side in (40, 64, 100, 128, 224, 256, 300, 640):
        for progressive in (False, True):
            height = int(side * rng.uniform(0.6, 1.4))
            image = Image.fromarray(rng.integers(0, 256, (height, side, 3), dtype=np.uint8))
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=85, progressive=progressive)
            data = buffer.getvalue()
            assert jpeg_size(data) == (side, height)
            reference = Image.open(io.BytesIO(data))
            reference.draft("L", (DRAFT_SIDE, DRAFT_SIDE))
            expected = reference.convert("L").resize((SAMPLE_SIDE, SAMPLE_SIDE), Image.Resampling.LANCZOS)
            assert np.array_equal(gray32(data), np.asarray(expected)), (side, progressive)
    assert jpeg_size(b"\x89PNG\r\n") is None and jpeg_size(b"\xff\xd8\xff") is None
