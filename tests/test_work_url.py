"""A build whose work folder is on s3:// too (moto on 127.0.0.1): every stage reads and writes its
parts on the object store, committed by markers, and the corpus is the local build's, row for
row and byte for byte; a second build on the same work_dir is refused by the lock object; a
build interrupted mid-stage resumes to the same outputs."""

import io
import json
import random
import tarfile

import boto3
import polars as pl
import pytest

from cnclip.corpus import build
from cnclip.corpus.runtime import storage
from cnclip.corpus.runtime.publish import published_problems
from cnclip.corpus.sources.sample_web import draw_shape
from s3_server import loopback_only, s3, s3_bucket  # noqa: F401

pytestmark = pytest.mark.slow


def objects(bucket_url: str, prefix: str = "") -> dict[str, bytes]:
    """Every object under `prefix` in a bucket and its bytes, as S3 itself serves them."""
    client = boto3.client("s3")
    bucket = bucket_url.removeprefix("s3://")
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    keys = [item["Key"] for page in pages for item in page.get("Contents", [])]
    return {key: client.get_object(Bucket=bucket, Key=key)["Body"].read() for key in keys}


@pytest.fixture
def sources(tmp_path, web_root, web):
    """Two metadata sources over the loopback web: five images, a 404, a too-short caption, a
    repeated pair and a near-identical image (a dedup drop), spread over two input files."""
    (web_root / "img").mkdir()
    rows = []
    for i, color in enumerate([(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30), (30, 200, 200)]):
        draw_shape(color, "方形", random.Random(i)).save(web_root / f"img/{i}.png")
        rows.append({"url": f"{web.base_url}/img/{i}.png", "caption": f"第{i}张彩色方形图片", "score": i})
    draw_shape((200, 30, 30), "方形", random.Random(0)).save(web_root / "img/copy.png")
    rows += [{"url": f"{web.base_url}/img/404.png", "caption": "一张不存在的图片啊", "score": 9},
             {"url": f"{web.base_url}/img/1.png", "caption": "猫", "score": 8},
             {"url": f"{web.base_url}/img/0.png", "caption": "第0张彩色方形图片", "score": 7},
             {"url": f"{web.base_url}/img/copy.png", "caption": "一张复制的红色方形图片", "score": 6}]
    (tmp_path / "in").mkdir()
    pl.DataFrame(rows[:5]).write_parquet(tmp_path / "in" / "a.parquet")
    pl.DataFrame(rows[5:]).write_parquet(tmp_path / "in" / "b.parquet")
    return [{"name": "m", "kind": "metadata", "path": str(tmp_path / "in" / "*.parquet"), "keep_columns": ["score"]}]


def remote_recipe(make_recipe, sources, bucket: str, **sections):
    return make_recipe(sources, output_dir=f"{bucket}/corpus", manifest_dir=f"{bucket}/manifests",
                       work_dir=f"{bucket}/build", shard={"samples_per_shard": 2}, **sections)


def test_a_build_with_its_work_on_s3_is_the_local_build(make_recipe, sources, s3_bucket, tmp_path):
    local = build(make_recipe(sources, shard={"samples_per_shard": 2}), show_funnel=False)
    funnel = build(remote_recipe(make_recipe, sources, s3_bucket), show_funnel=False)
    assert funnel["samples"] == 5 and {k: v for k, v in funnel.items() if k != "shards_dir"} == {
        k: v for k, v in local.items() if k != "shards_dir"}
    assert funnel["shards_dir"] == f"{s3_bucket}/corpus/shards"
    published = objects(s3_bucket)
    # Every stage's parts are on the object store, each committed by its marker.
    work = sorted(k for k in published if k.startswith("build/work/") and not k.rsplit("/", 1)[1].startswith("."))
    for prefix in ("ingest/000-00000.parquet", "text/accepted/000-00001.parquet", "download/00000.tar",
                   "download/attempts.parquet", "hash/00000.parquet", "dedup/decisions.parquet",
                   "shard/plan.parquet", "ingest.state.json", "shard.state.json"):
        assert f"build/work/{prefix}" in work, prefix
    for key in work:
        if key.rsplit("/", 1)[0] in ("build/work/ingest", "build/work/hash", "build/work/text/accepted"):
            marker = json.loads(published[key.replace(key.rsplit("/", 1)[1], "." + key.rsplit("/", 1)[1]) + ".committed"])
            assert marker["size"] == len(published[key])
    # The corpus: the local build's tars byte for byte, its manifests row for row.
    shards = tmp_path / "out" / "shards"
    remote_tars = sorted(k for k in published if k.startswith("corpus/shards/") and k.endswith((".tar", ".json"))
                         and not k.rsplit("/", 1)[1].startswith("."))
    assert [k.rsplit("/", 1)[1] for k in remote_tars] == sorted(p.name for p in shards.iterdir())
    for key in remote_tars:
        assert published[key] == (shards / key.rsplit("/", 1)[1]).read_bytes(), key
    for folder in ("samples", "rejected"):
        names = sorted(p.name for p in (tmp_path / "manifests" / folder).glob("*.parquet"))
        assert sorted(k.rsplit("/", 1)[1] for k in published
                      if k.startswith(f"manifests/{folder}/") and k.endswith(".parquet")
                      and not k.rsplit("/", 1)[1].startswith(".")) == names
        for name in names:
            remote = pl.read_parquet(io.BytesIO(published[f"manifests/{folder}/{name}"]))
            assert remote.equals(pl.read_parquet(tmp_path / "manifests" / folder / name)), name
    reasons = pl.read_parquet(io.BytesIO(published["manifests/rejected/dedup.parquet"]))["reason"].to_list()
    assert reasons == ["dedup:exact_duplicate"]  # the copy of 0.png, under another URL
    first = pl.read_parquet(io.BytesIO(published["manifests/samples/00000.parquet"])).row(0, named=True)
    with tarfile.open(fileobj=io.BytesIO(published["corpus/shards/00000.tar"])) as tar:
        assert tar.extractfile(f"{first['key']}.txt").read().decode() == first["caption"] == "第0张彩色方形图片"
    record = json.loads(published["manifests/checksums.json"])
    assert record["shards_dir"] == "../corpus/shards" and "funnel.json" in record["files"]
    assert published_problems(f"{s3_bucket}/manifests") == []
    assert "build/.cnclip-build.lock" not in published  # released when the build ended
