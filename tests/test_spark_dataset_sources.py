"""A coco source (several captions per image, a copied image) built on the Spark engine: the
same samples and dedup decisions as the local engine, the rows of one image sharing its fate."""

import polars as pl
import pytest

from cnclip.corpus import build, parse_recipe
from dataset_files import write_coco
from spark_session import spark  # noqa: F401 (the session fixture)

pytestmark = [pytest.mark.slow, pytest.mark.spark]

SEEDS = {1: 11, 2: 12, 3: 11}  # image 3: the same file as image 1
CAPTIONS = [(1, "一只红色的猫在睡觉"), (2, "蓝天下的一座白色房子"), (1, "沙发上躺着一只小猫"), (3, "复制的图片的第一句"),
            (3, "复制的图片的第二句")]


def _build(root, **kwargs):
    coco = write_coco(root / "coco", SEEDS, CAPTIONS)
    data = {"name": "coco", "output_dir": str(root / "out"), "manifest_dir": str(root / "manifests"),
            "sources": [{"name": "coco", "kind": "coco", "annotations": str(coco), "images": str(root / "coco" / "images")}],
            "download": {"processes": 1, "threads": 2, "timeout": 3, "retries": 0},
            "image": {"size": 32, "min_side": 16}, "shard": {"processes": 1}, "text": {"processes": 1}}
    build(parse_recipe(data, "coco"), show_funnel=False, **kwargs)
    samples = pl.read_parquet(root / "manifests" / "samples" / "*.parquet")
    rejected = pl.read_parquet(root / "manifests" / "rejected" / "*.parquet")
    return (sorted(samples.select("image_id", "caption", "key").rows()),
            sorted(rejected.select("image_id", "caption", "reason", "duplicate_of").rows()))


def test_spark_keeps_and_drops_an_images_captions_together(spark, tmp_path):
    on_spark = _build(tmp_path / "spark", spark=spark)
    local = _build(tmp_path / "local")
    assert on_spark == local
    samples, rejected = on_spark
    assert [row[0] for row in samples] == [1, 1, 2]
    first = next(key for image_id, caption, key in samples if caption == "一只红色的猫在睡觉")
    assert rejected == [(3, "复制的图片的第一句", "dedup:exact_duplicate", first),
                        (3, "复制的图片的第二句", "dedup:exact_duplicate", first)]
