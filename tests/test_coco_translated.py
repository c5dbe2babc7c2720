"""The paper's recipe for COCO: a `coco` source (English captions, several per image, images from a
folder) translated by the translate stage before the Chinese-ratio filter. The translations reach
samples/ and the tars with the English kept, each image's captions stay together, and a caption
the backend cannot translate is rejected for that, not for being English."""

import sys
import tarfile
from pathlib import Path

import polars as pl
import pytest

from cnclip.corpus import build
from dataset_files import jpeg_bytes, mean_colour, write_coco
from translate_dictionary import DICTIONARY

pytestmark = pytest.mark.slow

SCRIPT = str(Path(__file__).with_name("translate_dictionary.py"))


def test_coco_captions_are_translated_before_the_chinese_filter(tmp_path, make_recipe):
    captions = [(1, "a red square"), (1, "a green circle"), (2, "a blue triangle"), (2, "a purple hexagon")]
    annotations = write_coco(tmp_path / "coco", {1: 11, 2: 12}, captions)
    source = {"name": "coco", "kind": "coco", "annotations": str(annotations), "images": str(tmp_path / "coco" / "images")}
    translate = {"sources": ["coco"], "backend": "command", "cache": str(tmp_path / "cache"),
                 "command": [sys.executable, SCRIPT, str(tmp_path / "calls.txt")]}
    build(make_recipe([source], translate=translate), show_funnel=False)

    samples = pl.read_parquet(tmp_path / "manifests" / "samples" / "*.parquet").sort("uid")
    assert samples.select("image_id", "caption", "caption_en").rows() == [
        (1, DICTIONARY["a red square"], "a red square"),
        (1, DICTIONARY["a green circle"], "a green circle"),
        (2, DICTIONARY["a blue triangle"], "a blue triangle"),
    ]
    rejected = pl.read_parquet(tmp_path / "manifests" / "rejected" / "*.parquet")
    assert rejected.select("image_id", "reason", "caption_en").rows() == [(2, "translate:failed", "a purple hexagon")]
    # Each sample's tar members: the Chinese caption, and its own image (resized to 32 px: told
    # by its mean colour, each test image being of its own base colour).
    seeds = {1: 11, 2: 12}
    for row in samples.iter_rows(named=True):
        with tarfile.open(tmp_path / "out" / "shards" / f"{row['key'][:5]}.tar") as tar:
            assert tar.extractfile(f"{row['key']}.txt").read().decode() == row["caption"]
            stored = tar.extractfile(f"{row['key']}.jpg").read()
        assert abs(mean_colour(stored) - mean_colour(jpeg_bytes(seeds[row["image_id"]]))).max() < 8
