"""The demo web built on the Spark engine (local[2]) with its shards and manifests published to
s3:// (moto on 127.0.0.1, a local work_dir) against the build recorded with the local engine
(golden_demo.py, which test_golden_demo.py holds the local engine to): the objects on the server
are byte-identical tars, the same sample keys and manifest rows, the same funnel. One build, on
Spark; the local engine's side is the recording, so this costs no second build."""

import hashlib
import io
import json
import uuid

import boto3
import polars as pl
import pytest
from polars.testing import assert_frame_equal

from cnclip.corpus import build, parse_recipe
from cnclip.corpus.recipe import SPARK_URL_WORK_DIR, RecipeError
from cnclip.corpus.runtime.publish import published_problems
from golden_demo import GOLDEN, demo_recipe
from s3_server import loopback_only, refusing_non_loopback, s3  # noqa: F401
from spark_session import spark  # noqa: F401 (the session fixture)

pytestmark = [pytest.mark.slow, pytest.mark.spark]


def objects(bucket_url: str) -> dict[str, bytes]:
    """Every object in the bucket and its bytes, as S3 itself serves them."""
    client = boto3.client("s3")
    bucket = bucket_url.removeprefix("s3://")
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
    keys = [item["Key"] for page in pages for item in page.get("Contents", [])]
    return {key: client.get_object(Bucket=bucket, Key=key)["Body"].read() for key in keys}


def published_rows(published: dict[str, bytes], folder: str) -> pl.DataFrame:
    """One manifest folder's parts as served (markers and hidden files left out), concatenated by
    name and sorted as golden_demo.manifest_rows sorts the recording."""
    names = sorted(k for k in published if k.startswith(f"manifests/{folder}/") and k.endswith(".parquet")
                   and not k.rsplit("/", 1)[1].startswith("."))
    frame = pl.concat([pl.read_parquet(io.BytesIO(published[k])) for k in names], how="diagonal_relaxed")
    return frame.sort(frame.columns[:2], nulls_last=True)


@pytest.fixture(scope="module")
def spark_on_s3(tmp_path_factory, spark, s3):  # noqa: F811
    import s3fs

    root = tmp_path_factory.mktemp("spark-s3")
    bucket = f"s3://cnclip-spark-{uuid.uuid4().hex[:12]}"
    recipe = demo_recipe(root)
    recipe.update(output_dir=f"{bucket}/corpus", manifest_dir=f"{bucket}/manifests", work_dir=str(root / "work"))
    with refusing_non_loopback() as attempts:
        s3fs.S3FileSystem().mkdir(bucket.removeprefix("s3://"))
        funnel = build(parse_recipe(recipe), show_funnel=False, spark=spark)
        published = objects(bucket)
    assert attempts == [], f"connections attempted outside loopback: {attempts}"
    return bucket, funnel, published


def test_tars_on_the_server_are_the_local_engines_bytes(spark_on_s3):
    _, _, published = spark_on_s3
    tars = {k.rsplit("/", 1)[1]: hashlib.sha256(v).hexdigest() for k, v in published.items()
            if k.startswith("corpus/shards/") and k.endswith(".tar") and not k.rsplit("/", 1)[1].startswith(".")}
    recorded = json.loads((GOLDEN / "tars.json").read_text())
    assert len(recorded) == 3
    assert tars == recorded


@pytest.mark.parametrize("folder", ["samples", "rejected"])
def test_manifest_rows_on_the_server_are_the_same(spark_on_s3, folder):
    recorded = pl.read_parquet(GOLDEN / f"{folder}.parquet")
    assert recorded.height > 0
    assert_frame_equal(published_rows(spark_on_s3[2], folder), recorded)


def test_sample_keys_on_the_server_are_the_same(spark_on_s3):
    keys = published_rows(spark_on_s3[2], "samples")["key"].sort().to_list()
    assert keys == pl.read_parquet(GOLDEN / "samples.parquet")["key"].sort().to_list()
    assert len(keys) == len(set(keys)) > 0


def test_the_published_funnel_is_the_same_and_the_corpus_checks(spark_on_s3, loopback_only):  # noqa: F811
    bucket, funnel, published = spark_on_s3
    recorded = json.loads((GOLDEN / "funnel.json").read_text(encoding="utf-8"))
    assert recorded["stages"][3]["rejected"]  # dedup dropped rows: its Spark form ran on them
    remote = json.loads(published["manifests/funnel.json"])
    assert remote.pop("shards_dir") == f"{bucket}/corpus/shards"
    assert remote == recorded
    assert {k: v for k, v in funnel.items() if k != "shards_dir"} == recorded
    assert published_problems(f"{bucket}/manifests") == []


URL_WORK = {"output_dir": "s3://b/corpus", "manifest_dir": "s3://b/manifests", "work_dir": "s3://b/build",
            "sources": [{"name": "m", "kind": "metadata", "path": "s3://b/in/*.parquet"}]}


def test_a_url_work_dir_on_spark_is_refused_at_recipe_load(loopback_only):  # noqa: F811
    """The same folders pass on the local engine; on Spark one line names both keys and what to
    use instead, before any session starts or any object is touched."""
    assert parse_recipe({"name": "t", **URL_WORK}, "r.yaml").work_dir == "s3://b/build"
    with pytest.raises(RecipeError) as refused:
        parse_recipe({"name": "t", **URL_WORK, "engine": {"kind": "spark"}}, "r.yaml")
    assert str(refused.value) == f"r.yaml: engine: {SPARK_URL_WORK_DIR} (got {{'kind': 'spark'}})"
    assert "\n" not in str(refused.value) and "work_dir" in SPARK_URL_WORK_DIR and "engine.kind spark" in SPARK_URL_WORK_DIR
    local = parse_recipe({"name": "t", **URL_WORK, "work_dir": "/mnt/nfs/build", "engine": {"kind": "spark"}}, "r.yaml")
    assert str(local.work_dir) == "/mnt/nfs/build"  # the way out the message names


def test_a_session_handed_to_build_is_refused_a_url_work_dir(spark, loopback_only):  # noqa: F811
    """build(spark=) does not read the recipe's engine block, so it checks again; it stops before
    the bucket is asked anything (loopback_only records any connection)."""
    recipe = parse_recipe({"name": "t", **URL_WORK}, "r.yaml")
    with pytest.raises(RecipeError) as refused:
        build(recipe, show_funnel=False, spark=spark)
    assert str(refused.value) == f"build: {SPARK_URL_WORK_DIR}"
