"""A corpus published to s3:// (moto on 127.0.0.1) used as a local one: `corpus verify` and
`corpus stats` read it through fsspec and find the same damage as on a disk, a tar whose members
disagree with its samples/ part is found (on a disk and on the store), `cnclip train` streams its
shards, and a URL that is not there or needs a driver that is not installed is one line.

One build, published once per module; each test gets its own bucket holding a copy of it.
"""

import io
import json
import random
import shutil
import sys
import tarfile
import uuid

import boto3
import polars as pl
import pytest
import yaml
from typer.testing import CliRunner

from cnclip.cli import app
from cnclip.corpus import build, corpus_stats, parse_recipe
from cnclip.corpus.runtime import storage
from cnclip.corpus.sources.sample_web import SampleWebServer, draw_shape
from cnclip.train.runlog import read_log
from s3_server import loopback_only, refusing_non_loopback, s3, s3_bucket  # noqa: F401
from test_train_support import write_config

pytestmark = pytest.mark.slow
runner = CliRunner()


def new_bucket() -> str:
    import s3fs

    name = f"cnclip-test-{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem().mkdir(name)
    return name


@pytest.fixture(scope="module")
def published(s3, tmp_path_factory):
    """A small build (5 images, one 404, one caption too short) published to a
    module bucket: (bucket name, the local staged copy's folder, the funnel)."""
    root = tmp_path_factory.mktemp("url_corpus")
    site = root / "site"
    site.mkdir()
    colors = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30), (30, 200, 200)]
    for i, color in enumerate(colors):
        draw_shape(color, "方形", random.Random(i)).save(site / f"{i}.png")
    with refusing_non_loopback() as attempts, SampleWebServer(site, port=0) as web:
        rows = [{"url": f"{web.base_url}/{i}.png", "caption": f"第{i}张彩色方形图片"} for i in range(5)]
        rows += [{"url": f"{web.base_url}/404.png", "caption": "一张不存在的图片啊"},
                 {"url": f"{web.base_url}/0.png", "caption": "cat"}]
        pl.DataFrame(rows).write_parquet(root / "list.parquet")
        bucket = new_bucket()
        recipe = {
            "name": "url", "output_dir": f"s3://{bucket}/corpus", "manifest_dir": f"s3://{bucket}/manifests",
            "work_dir": str(root / "scratch"),
            "sources": [{"name": "m", "kind": "metadata", "path": str(root / "list.parquet")}],
            "download": {"processes": 1, "threads": 8, "timeout": 3, "retries": 0, "samples_per_part": 50,
                         "allow_networks": ["127.0.0.1/32"], "per_host_delay": 0, "per_host_concurrency": 64},
            "image": {"size": 32, "min_side": 16},
            "shard": {"samples_per_shard": 2, "processes": 1},
            "text": {"processes": 1},
        }
        (root / "recipe.yaml").write_text(yaml.safe_dump(recipe, allow_unicode=True), encoding="utf-8")
        funnel = build(parse_recipe(recipe, "url-recipe"), show_funnel=False)
    assert attempts == []
    assert (funnel["samples"], funnel["rejected"]) == (5, 2)
    return bucket, root, funnel


def copy_bucket(source: str, target: str) -> None:
    client = boto3.client("s3")
    for item in client.list_objects_v2(Bucket=source).get("Contents", []):
        client.copy_object(Bucket=target, Key=item["Key"], CopySource={"Bucket": source, "Key": item["Key"]})


@pytest.fixture
def corpus(published, s3_bucket):
    """This test's copy of the published corpus, in its own bucket (loopback only meanwhile)."""
    bucket, root, funnel = published
    copy_bucket(bucket, s3_bucket.removeprefix("s3://"))
    return {"manifests": f"{s3_bucket}/manifests", "shards": f"{s3_bucket}/corpus/shards", "root": root,
            "funnel": funnel, "bucket": s3_bucket}


def error_lines(output: str) -> list[str]:
    return [line.removeprefix("error: ") for line in output.splitlines() if line.strip()]


def test_verify_and_stats_read_the_store_as_they_read_a_disk(corpus):
    manifests, funnel = corpus["manifests"], corpus["funnel"]
    result = runner.invoke(app, ["corpus", "verify", manifests])
    assert result.exit_code == 0, result.output
    recorded = json.loads(storage.read_text(f"{manifests}/checksums.json"))["files"]
    assert set(recorded) == {"shards/00000.tar", "shards/00001.tar", "shards/00002.tar", "shards/sizes.json",
                             "samples/00000.parquet", "samples/00001.parquet", "samples/00002.parquet",
                             "rejected/text-000-00000.parquet", "rejected/download.parquet",
                             "rejected/dedup.parquet", "funnel.json"}
    files = len(recorded)
    assert result.output == (f"{manifests}: intact: {files} files match checksums.json; 5 samples + 2 rejected = "
                             f"{funnel['input_rows']} input rows\n")
    result = runner.invoke(app, ["corpus", "stats", manifests, "--json"])
    assert result.exit_code == 0, result.output
    remote = json.loads(result.output)
    local = corpus_stats(corpus["root"] / "scratch" / "manifests")  # the staged copy the build published
    assert remote["problems"] == [] and local["problems"] == []
    assert remote["samples"] == 5 and remote["rejected_by_reason"] == {"download:failed_to_download": 1,
                                                                        "text:too_short": 1}
    assert {**remote, "manifest_dir": None, "funnel": None} == {**local, "manifest_dir": None, "funnel": None}
    assert {**remote["funnel"], "shards_dir": None} == {**local["funnel"], "shards_dir": None}


def put(url: str, data: bytes) -> None:
    bucket, _, key = url.removeprefix("s3://").partition("/")
    boto3.client("s3").put_object(Bucket=bucket, Key=key, Body=data)


def delete(url: str) -> None:
    bucket, _, key = url.removeprefix("s3://").partition("/")
    boto3.client("s3").delete_object(Bucket=bucket, Key=key)


def marker(url: str) -> str:
    folder, _, name = url.rpartition("/")
    return f"{folder}/.{name}.committed"


def test_deleted_truncated_uncommitted_and_foreign_shards_on_the_store(corpus):
    manifests, shards = corpus["manifests"], corpus["shards"]
    tars = [f"{shards}/{i:05d}.tar" for i in range(3)]
    size = len(storage.read_bytes(tars[1]))
    delete(tars[0])  # its marker stays: a marker alone is no part
    put(tars[1], storage.read_bytes(tars[1])[:1000])  # rewritten short by someone else, marker left
    delete(marker(tars[2]))  # an upload that never finished
    put(f"{shards}/99999.tar", storage.read_bytes(tars[2]))
    result = runner.invoke(app, ["corpus", "verify", manifests])
    assert result.exit_code == 2
    assert error_lines(result.output) == [
        f"{tars[0]}: missing",
        f"{tars[1]}: 1000 bytes, checksums.json records {size} (truncated)",
        f"{tars[2]}: not committed (no marker: its upload did not finish)",
        f"{shards}/99999.tar: not in checksums.json (not written by this build)"]
    # stats counts what the manifests hold and says the shards are damaged (sizes only, no hashing).
    stats = corpus_stats(manifests)
    assert stats["samples"] == 5
    assert stats["problems"] == [f"{tars[0]}: missing",
                                 f"{tars[1]}: 1000 bytes, checksums.json records {size} (truncated)",
                                 f"{tars[2]}: not committed (no marker: its upload did not finish)",
                                 f"run `cnclip corpus verify {manifests}` for a full check"]


def test_a_changed_byte_a_lost_manifest_part_and_a_missing_record_on_the_store(corpus):
    manifests, shards, funnel = corpus["manifests"], corpus["shards"], corpus["funnel"]
    sizes = storage.read_bytes(f"{shards}/sizes.json")
    changed = sizes.replace(b": 2", b": 3", 1)
    assert changed != sizes and len(changed) == len(sizes)
    put(f"{shards}/sizes.json", changed)
    part = f"{manifests}/samples/00001.parquet"
    lost = pl.read_parquet(io.BytesIO(storage.read_bytes(part))).height
    delete(part)
    delete(marker(part))
    result = runner.invoke(app, ["corpus", "verify", manifests])
    assert result.exit_code == 2
    assert error_lines(result.output) == [
        f"{part}: missing",
        f"{shards}/sizes.json: SHA-256 differs from checksums.json (changed)",
        f"{manifests}: {funnel['input_rows']} input rows but {5 - lost} samples + 2 rejected "
        f"({funnel['input_rows'] - lost} distinct rows)"]
    assert corpus_stats(manifests)["problems"][0] == (
        f"{manifests}: funnel.json counts 5 samples and 2 rejected; the manifests on disk hold {5 - lost} and 2")
    delete(f"{manifests}/checksums.json")
    result = runner.invoke(app, ["corpus", "verify", manifests])
    assert result.exit_code == 2
    assert error_lines(result.output) == [f"{manifests}/checksums.json: missing (not a finished build)"]


def test_shards_moved_off_the_store_verify_with_shards_dir(corpus, tmp_path):
    """--shards-dir names where the shards are now: here a local folder beside manifests that stay
    on the store (tars checked locally, their members against the store's samples/ parts)."""
    manifests, shards = corpus["manifests"], corpus["shards"]
    moved = tmp_path / "shards"
    moved.mkdir()
    for name in ("00000.tar", "00001.tar", "00002.tar", "sizes.json"):
        (moved / name).write_bytes(storage.read_bytes(f"{shards}/{name}"))
        delete(f"{shards}/{name}")
    result = runner.invoke(app, ["corpus", "verify", manifests])
    assert result.exit_code == 2
    assert error_lines(result.output) == [f"{shards}/{name}: missing"
                                          for name in ("00000.tar", "00001.tar", "00002.tar", "sizes.json")]
    result = runner.invoke(app, ["corpus", "verify", manifests, "--shards-dir", str(moved)])
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"{manifests}: intact: 11 files match checksums.json")
    size = (moved / "00002.tar").stat().st_size
    with open(moved / "00002.tar", "r+b") as stream:
        stream.truncate(100)
    result = runner.invoke(app, ["corpus", "verify", manifests, "--shards-dir", str(moved)])
    assert result.exit_code == 2
    assert error_lines(result.output) == [f"{moved / '00002.tar'}: 100 bytes, checksums.json records {size} (truncated)"]


def without_last_sample(data: bytes) -> tuple[bytes, str]:
    """The tar with every member of its last sample left out, and that sample's key."""
    source = tarfile.open(fileobj=io.BytesIO(data))
    members = source.getmembers()
    last = members[-1].name.split(".", 1)[0]
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as target:
        for member in members:
            if member.name.split(".", 1)[0] != last:
                target.addfile(member, source.extractfile(member))
    return out.getvalue(), last


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_tar_whose_members_disagree_with_its_samples_part(where, corpus, tmp_path):
    """A build that wrote a tar short of a sample its manifest lists, and recorded those bytes:
    the checksums match, the member check does not."""
    if where == "local":
        shutil.copytree(corpus["root"] / "scratch", tmp_path / "copy")
        manifests, shards = str(tmp_path / "copy" / "manifests"), str(tmp_path / "copy" / "shards")
    else:
        manifests, shards = corpus["manifests"], corpus["shards"]
    tar, part = storage.join(shards, "00000.tar"), storage.join(manifests, "samples", "00000.parquet")
    data, key = without_last_sample(storage.read_bytes(tar))
    keys = pl.read_parquet(io.BytesIO(storage.read_bytes(part)))["key"].to_list()
    assert key in keys and len(keys) == 2
    storage.write_bytes(tar, data)
    record = json.loads(storage.read_text(storage.join(manifests, "checksums.json")))
    import hashlib

    record["files"]["shards/00000.tar"] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    storage.write_text(storage.join(manifests, "checksums.json"), json.dumps(record))
    result = runner.invoke(app, ["corpus", "verify", manifests])
    assert result.exit_code == 2
    assert error_lines(result.output) == [f"{tar}: 1 row(s) of {part} not in the tar ({key})"]


def test_cnclip_train_streams_the_published_shards(published, loopback_only, tmp_path):
    bucket, root, funnel = published
    shards = [f"s3://{bucket}/corpus/shards/{i:05d}.tar" for i in range(3)]
    # One DataLoader worker: a process of its own opens the tars, with the driver's settings from
    # the environment (the endpoint on 127.0.0.1).
    # An evaluation set on the store too, read at each stage end.
    config = write_config(tmp_path / "cfg", None, data={"manifest_dir": f"s3://{bucket}/manifests", "workers": 1},
                          batch_size=4, stage1={"steps": 2}, stage2={"steps": 2},
                          eval={"sets": [{"name": "held", "data": f"s3://{bucket}/corpus/shards/{{00000..00001}}.tar"}],
                                "at_start": False})
    result = runner.invoke(app, ["train", config])
    assert result.exit_code == 0, result.output
    train_log = read_log(tmp_path / "cfg" / "run", "train")
    assert [(r["stage"], r["step"]) for r in train_log] == [(1, 1), (1, 2), (2, 1), (2, 2)]
    # Every tar read whole: no shard counted unreadable, no sample undecodable.
    assert {(sum(r["bad_shards"]), sum(r["bad_samples"])) for r in train_log} == {(0, 0)}
    # 4 steps of 4 samples over the 5 the manifests count: the epochs come from the store's manifests.
    assert train_log[-1]["epoch"] == pytest.approx(16 / 5)
    read = {url for event in read_log(tmp_path / "cfg" / "run", "data") for rank in event["shards_by_rank"]
            for url in rank}
    assert read == set(shards)
    evals = read_log(tmp_path / "cfg" / "run", "eval")
    assert [(e["stage"], e["set"], e["images"], e["texts"]) for e in evals] == [(1, "held", 4, 4), (2, "held", 4, 4)]
    vocab = (tmp_path / "cfg" / "run" / "vocab.txt").read_text(encoding="utf-8").split()
    assert {"彩", "方", "形"} <= set(vocab)  # the corpus vocab, from the captions in the store's samples/


def test_a_corpus_recipe_publishing_to_s3_names_its_shards_and_counts(published, loopback_only):
    from cnclip.train.config import DataSettings
    from cnclip.train.data import resolve_train_shards

    bucket, root, _ = published
    found = resolve_train_shards(DataSettings(corpus=root / "recipe.yaml"))
    assert found.shards == [f"s3://{bucket}/corpus/shards/{i:05d}.tar" for i in range(3)]
    assert found.samples == 5 and found.manifest_dir == f"s3://{bucket}/manifests"


def test_a_missing_bucket_or_folder_is_one_line(s3_bucket, tmp_path):
    missing = f"cnclip-missing-{uuid.uuid4().hex[:8]}"
    for command in ("verify", "stats"):
        result = runner.invoke(app, ["corpus", command, f"s3://{missing}/manifests"])
        assert result.exit_code == 2
        assert error_lines(result.output) == [f"s3://{missing}/manifests: no such bucket (s3://{missing})"]
        result = runner.invoke(app, ["corpus", command, f"{s3_bucket}/nothing"])
        assert result.exit_code == 2
        assert error_lines(result.output) == [f"{s3_bucket}/nothing: not found"]
    config = write_config(tmp_path / "a", None, data={"manifest_dir": f"s3://{missing}/m", "workers": 0})
    result = runner.invoke(app, ["train", config])
    assert result.exit_code == 2
    assert error_lines(result.output) == [
        f"data.manifest_dir: s3://{missing}/m/funnel.json: no such bucket (s3://{missing})"]
    config = write_config(tmp_path / "b", f"{s3_bucket}/shards/00000.tar", data={"workers": 0})
    result = runner.invoke(app, ["train", config])
    assert result.exit_code == 2
    assert error_lines(result.output) == [f"data.train: no such shard: {s3_bucket}/shards/00000.tar"]


def test_an_unknown_scheme_is_one_line():
    result = runner.invoke(app, ["corpus", "verify", "s4://corpora/manifests"])
    assert result.exit_code == 2
    assert error_lines(result.output) == [
        "s4://corpora/manifests: no fsspec filesystem knows the scheme s4:// (a typo, or a driver not installed)"]


def test_a_scheme_whose_driver_is_not_installed_names_the_package(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "gcsfs", None)  # as on a machine without it
    for command in ("verify", "stats"):
        result = runner.invoke(app, ["corpus", command, "gs://corpora/manifests"])
        assert result.exit_code == 2
        assert error_lines(result.output) == [
            "gs://corpora/manifests: reading gs:// URLs needs the gcsfs package (pip install gcsfs)"]
    config = write_config(tmp_path, "gs://corpora/shards/{00000..00002}.tar", data={"workers": 0})
    result = runner.invoke(app, ["train", config])
    assert result.exit_code == 2
    assert error_lines(result.output) == [
        "gs://corpora/shards/00000.tar: reading gs:// URLs needs the gcsfs package (pip install gcsfs)"]
