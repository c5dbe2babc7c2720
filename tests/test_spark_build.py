"""The demo web built on the Spark engine (local[2]) against the build recorded with the local
engine (golden_demo.py): byte-identical tars, the same sample keys and manifest rows, the same
funnel. The demo has exact and near duplicates, so dedup runs its Spark form on real images."""

import io
import json

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from cnclip.corpus import build, parse_recipe
from cnclip.corpus.runtime.spark_engine import SparkEngine
from golden_demo import (
    GOLDEN,
    assert_funnel_matches,
    assert_rows_match,
    assert_tars_match,
    demo_recipe,
    manifest_rows,
    tar_digests,
)
from spark_session import spark  # noqa: F401 (the session fixture)

pytestmark = [pytest.mark.slow, pytest.mark.spark]


MAPS = {"text: normalize + filter", "text: duplicates + caption cap", "download: lanes",
        "hash: pHash of stored images", "shard: write tars", "shard: checksums"}


@pytest.fixture(scope="module")
def spark_demo(tmp_path_factory, spark):
    root = tmp_path_factory.mktemp("spark-golden")
    maps = []
    original = SparkEngine.map_parts

    def recorded(self, fn, parts, description, processes=None):
        maps.append(description)
        return original(self, fn, parts, description, processes)

    spark.sparkContext.setJobGroup("spark-demo", "the demo build on the Spark engine")
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(SparkEngine, "map_parts", recorded)
            build(parse_recipe(demo_recipe(root)), show_funnel=False, spark=spark)
    finally:
        spark.sparkContext.setJobGroup("", "")
    # Every stage's per-part map ran as Spark tasks, and the global steps as Spark jobs.
    assert MAPS <= set(maps)
    assert len(spark.sparkContext.statusTracker().getJobIdsForGroup("spark-demo")) > 20
    return root


def test_tars_are_byte_identical(spark_demo):
    assert_tars_match(spark_demo)


@pytest.mark.parametrize("folder", ["samples", "rejected"])
def test_manifest_rows_are_the_same(spark_demo, folder):
    assert_rows_match(spark_demo, folder)


def test_sample_keys_are_the_same(spark_demo):
    keys = manifest_rows(spark_demo / "manifests", "samples")["key"].sort().to_list()
    assert keys == pl.read_parquet(GOLDEN / "samples.parquet")["key"].sort().to_list()
    assert len(keys) == len(set(keys)) > 0


def test_funnel_is_the_same(spark_demo):
    assert_funnel_matches(spark_demo)


def test_a_rerun_on_spark_redoes_only_the_parts_a_kill_left_undone(spark_demo, spark):
    """As after a job killed mid-stage: one hash part missing (its stage not finished) and one
    shard gone. The rerun's Spark maps get just those parts; the rest stay as they were, and the
    corpus comes out byte for byte the same. (Runs last: it leaves the build as it found it.)"""
    work, shards = spark_demo / "out" / "work", spark_demo / "out" / "shards"
    hash_parts = sorted((work / "hash").glob("*.parquet"))
    assert len(hash_parts) >= 2
    lost_hash = hash_parts[0].read_bytes()
    hash_parts[0].unlink()
    record = json.loads((work / "hash.state.json").read_text())
    (work / "hash.state.json").write_text(json.dumps({**record, "complete": False}))
    for lost in (shards / "00001.tar", spark_demo / "manifests" / "samples" / "00001.parquet"):
        lost.unlink()
    untouched = {p: p.stat().st_mtime_ns for p in [*hash_parts[1:], shards / "00000.tar", shards / "00002.tar"]}
    maps = {}
    original = SparkEngine.map_parts

    def recorded(self, fn, parts, description, processes=None):
        maps[description] = list(parts)
        return original(self, fn, parts, description, processes)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(SparkEngine, "map_parts", recorded)
        build(parse_recipe(demo_recipe(spark_demo)), show_funnel=False, spark=spark)
    assert [task[2] for task in maps["hash: pHash of stored images"]] == [hash_parts[0]]
    assert [task.shard for task in maps["shard: write tars"]] == [1]
    assert "download: lanes" not in maps and "text: normalize + filter" not in maps
    assert {p: p.stat().st_mtime_ns for p in untouched} == untouched
    assert pl.read_parquet(hash_parts[0]).equals(pl.read_parquet(io.BytesIO(lost_hash)))
    assert tar_digests(shards) == json.loads((GOLDEN / "tars.json").read_text())
    assert_frame_equal(manifest_rows(spark_demo / "manifests", "samples"), pl.read_parquet(GOLDEN / "samples.parquet"))
