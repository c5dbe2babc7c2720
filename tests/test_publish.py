"""A whole small build publishing its shards and manifests to s3:// (moto on 127.0.0.1): the
objects are the local build's bytes, committed by markers, checked by checksums.json; a rerun
uploads nothing, a damaged object is uploaded again."""

import io
import json
import random
import tarfile

import boto3
import polars as pl
import pytest

from cnclip.corpus import build
from cnclip.corpus.recipe import RecipeError, parse_recipe
from cnclip.corpus.runtime import storage
from cnclip.corpus.runtime.publish import published_problems
from cnclip.corpus.sources.sample_web import draw_shape
from s3_server import loopback_only, s3, s3_bucket  # noqa: F401

pytestmark = pytest.mark.slow


def objects(bucket_url: str) -> dict[str, bytes]:
    """Every object in a bucket and its bytes, as S3 itself serves them."""
    client = boto3.client("s3")
    bucket = bucket_url.removeprefix("s3://")
    keys = [item["Key"] for item in client.list_objects_v2(Bucket=bucket).get("Contents", [])]
    return {key: client.get_object(Bucket=bucket, Key=key)["Body"].read() for key in keys}


@pytest.fixture
def remote_build(tmp_path, web_root, web, make_recipe, s3_bucket):
    (web_root / "img").mkdir()
    rows = []
    for i, color in enumerate([(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30), (30, 200, 200)]):
        draw_shape(color, "方形", random.Random(i)).save(web_root / f"img/{i}.png")
        rows.append({"url": f"{web.base_url}/img/{i}.png", "caption": f"第{i}张彩色方形图片"})
    rows.append({"url": f"{web.base_url}/img/404.png", "caption": "一张不存在的图片啊"})
    pl.DataFrame(rows).write_parquet(tmp_path / "list.parquet")
    recipe = make_recipe([{"name": "m", "kind": "metadata", "path": str(tmp_path / "list.parquet")}],
                         output_dir=f"{s3_bucket}/corpus", manifest_dir=f"{s3_bucket}/manifests",
                         work_dir=str(tmp_path / "scratch"), shard={"samples_per_shard": 2})
    return recipe, build(recipe, show_funnel=False)


def test_shards_and_manifests_are_published_to_s3(remote_build, s3_bucket, tmp_path):
    recipe, funnel = remote_build
    assert funnel["samples"] == 5 and funnel["rejected"] == 1
    published = objects(s3_bucket)
    staged = tmp_path / "scratch"
    tars = sorted(k for k in published if k.startswith("corpus/shards/") and k.endswith(".tar"))
    assert tars == ["corpus/shards/00000.tar", "corpus/shards/00001.tar", "corpus/shards/00002.tar"]
    for key in tars + ["corpus/shards/sizes.json"]:
        assert published[key] == (staged / "shards" / key.rsplit("/", 1)[1]).read_bytes()
        assert json.loads(published[key.replace("shards/", "shards/.") + ".committed"])["size"] == len(published[key])
    samples = pl.concat([pl.read_parquet(io.BytesIO(published[k])) for k in sorted(published)
                         if k.startswith("manifests/samples/") and k.endswith(".parquet")])
    assert samples.sort("uid").equals(pl.read_parquet(staged / "manifests" / "samples" / "*.parquet").sort("uid"))
    with tarfile.open(fileobj=io.BytesIO(published["corpus/shards/00000.tar"])) as tar:
        assert tar.extractfile(f"{samples['key'][0]}.txt").read().decode() == samples["caption"][0]
    rejected = pl.read_parquet(io.BytesIO(published["manifests/rejected/download.parquet"]))
    assert rejected["reason"].to_list() == ["download:failed_to_download"]
    remote_funnel = json.loads(published["manifests/funnel.json"])
    assert remote_funnel["shards_dir"] == f"{s3_bucket}/corpus/shards"
    assert {k: v for k, v in remote_funnel.items() if k != "shards_dir"} == {
        k: v for k, v in funnel.items() if k != "shards_dir"}
    record = json.loads(published["manifests/checksums.json"])
    assert record["shards_dir"] == "../corpus/shards"
    assert set(record["files"]) == {"shards/00000.tar", "shards/00001.tar", "shards/00002.tar", "shards/sizes.json",
                                    "samples/00000.parquet", "samples/00001.parquet", "samples/00002.parquet",
                                    "rejected/download.parquet", "rejected/dedup.parquet", "funnel.json"}
    assert published_problems(f"{s3_bucket}/manifests") == []


def test_a_rerun_uploads_nothing_and_a_damaged_object_is_uploaded_again(remote_build, s3_bucket):
    recipe, _ = remote_build
    before = objects(s3_bucket)
    client, bucket = boto3.client("s3"), s3_bucket.removeprefix("s3://")

    def stamps():
        return {item["Key"]: item["LastModified"] for item in client.list_objects_v2(Bucket=bucket)["Contents"]
                if item["Key"] != "manifests/checksums.json"}

    first = stamps()
    build(recipe, show_funnel=False)
    assert stamps() == first
    client.put_object(Bucket=bucket, Key="corpus/shards/00001.tar", Body=b"truncated")  # its marker stays
    problems = published_problems(f"{s3_bucket}/manifests")
    assert len(problems) == 1 and problems[0].startswith(f"{s3_bucket}/corpus/shards/00001.tar: 9 bytes")
    build(recipe, show_funnel=False)
    assert objects(s3_bucket) == before and published_problems(f"{s3_bucket}/manifests") == []
    client.delete_object(Bucket=bucket, Key="corpus/shards/.00001.tar.committed")  # as an upload cut short
    assert published_problems(f"{s3_bucket}/manifests") == [
        f"{s3_bucket}/corpus/shards/00001.tar: missing or not committed"]
    build(recipe, show_funnel=False)
    assert objects(s3_bucket) == before and published_problems(f"{s3_bucket}/manifests") == []


def test_a_url_output_needs_a_local_work_dir_and_url_manifests(tmp_path):
    base = {"name": "t", "sources": [{"name": "m", "kind": "metadata", "path": "s3://b/in/*.parquet"}]}
    cases = [
        ({"output_dir": "s3://b/out", "manifest_dir": "s3://b/manifests"}, "set work_dir to a local folder"),
        ({"output_dir": "s3://b/out", "manifest_dir": str(tmp_path / "m"), "work_dir": str(tmp_path)},
         "manifest_dir must be one too"),
        ({"output_dir": str(tmp_path / "o"), "manifest_dir": str(tmp_path / "m"), "work_dir": str(tmp_path)},
         "work_dir is only for a URL"),
    ]
    for folders, message in cases:
        with pytest.raises(RecipeError, match=message):
            parse_recipe({**base, **folders}, "t")
    recipe = parse_recipe({**base, "output_dir": "s3://b/out/", "manifest_dir": "s3://b/manifests",
                           "work_dir": str(tmp_path / "w")}, "t")
    assert recipe.output_dir == "s3://b/out" and storage.is_url(recipe.manifest_dir)
