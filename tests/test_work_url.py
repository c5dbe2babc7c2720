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
    sections = {"shard": {"samples_per_shard": 2}, **sections}
    return make_recipe(sources, output_dir=f"{bucket}/corpus", manifest_dir=f"{bucket}/manifests",
                       work_dir=f"{bucket}/build", **sections)


def assert_same_corpus(published: dict[str, bytes], root) -> None:
    """The published corpus is the local build under `root`: its tars and sizes.json byte for
    byte, each samples/ and rejected/ part row for row."""
    shards = root / "out" / "shards"
    remote_tars = sorted(k for k in published if k.startswith("corpus/shards/") and k.endswith((".tar", ".json"))
                         and not k.rsplit("/", 1)[1].startswith("."))
    assert [k.rsplit("/", 1)[1] for k in remote_tars] == sorted(p.name for p in shards.iterdir())
    for key in remote_tars:
        assert published[key] == (shards / key.rsplit("/", 1)[1]).read_bytes(), key
    for folder in ("samples", "rejected"):
        names = sorted(p.name for p in (root / "manifests" / folder).glob("*.parquet"))
        assert sorted(k.rsplit("/", 1)[1] for k in published
                      if k.startswith(f"manifests/{folder}/") and k.endswith(".parquet")
                      and not k.rsplit("/", 1)[1].startswith(".")) == names
        for name in names:
            remote = pl.read_parquet(io.BytesIO(published[f"manifests/{folder}/{name}"]))
            assert remote.equals(pl.read_parquet(root / "manifests" / folder / name)), name


def test_a_build_with_its_work_on_s3_is_the_local_build(make_recipe, sources, s3_bucket, tmp_path):
    local = build(make_recipe(sources, shard={"samples_per_shard": 2}), show_funnel=False)
    # Per-part maps in spawned workers here, as executors would run them: each reaches the store itself.
    workers = {"text": {"processes": 2}, "dedup": {"processes": 2}, "shard": {"samples_per_shard": 2, "processes": 2}}
    funnel = build(remote_recipe(make_recipe, sources, s3_bucket, **workers), show_funnel=False)
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
    assert_same_corpus(published, tmp_path)
    reasons = pl.read_parquet(io.BytesIO(published["manifests/rejected/dedup.parquet"]))["reason"].to_list()
    assert reasons == ["dedup:exact_duplicate"]  # the copy of 0.png, under another URL
    first = pl.read_parquet(io.BytesIO(published["manifests/samples/00000.parquet"])).row(0, named=True)
    with tarfile.open(fileobj=io.BytesIO(published["corpus/shards/00000.tar"])) as tar:
        assert tar.extractfile(f"{first['key']}.txt").read().decode() == first["caption"] == "第0张彩色方形图片"
    record = json.loads(published["manifests/checksums.json"])
    assert record["shards_dir"] == "../corpus/shards" and "funnel.json" in record["files"]
    assert published_problems(f"{s3_bucket}/manifests") == []
    assert "build/.cnclip-build.lock" not in published  # released when the build ended
    # A damaged object is found by the next build, which writes the corpus again.
    client, bucket = boto3.client("s3"), s3_bucket.removeprefix("s3://")
    client.put_object(Bucket=bucket, Key="corpus/shards/00001.tar", Body=b"truncated")  # its marker stays
    build(remote_recipe(make_recipe, sources, s3_bucket), show_funnel=False)
    assert_same_corpus(objects(s3_bucket), tmp_path)
    assert published_problems(f"{s3_bucket}/manifests") == []


def _lock_record(host: str, pid: int) -> bytes:
    return json.dumps({"tool": "cnclip", "host": host, "pid": pid, "token": "theirs",
                       "since": "2026-01-01T00:00:00Z"}).encode()


def test_a_second_build_on_the_same_work_dir_is_refused(make_recipe, sources, s3_bucket):
    """Another live build holds the lock object (a process of its own here): this one stops with
    one line, writing no work file, and the holder's lock stays."""
    import subprocess
    import sys

    from cnclip.corpus.pipeline import run_text
    from cnclip.corpus.runtime.ownership import BuildLockedError

    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from cnclip.corpus.runtime.ownership import build_lock\n"
         f"with build_lock('{s3_bucket}/build'):\n    print('held', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(BuildLockedError) as refused:
            run_text(remote_recipe(make_recipe, sources, s3_bucket))
        lock = json.loads(storage.read_bytes(f"{s3_bucket}/build/.cnclip-build.lock"))
        assert str(refused.value) == (
            f"{s3_bucket}/build: another build (PID {holder.pid} on {lock['host']}, since {lock['since']}) is running "
            f"on this work_dir; wait for it to end (or remove {s3_bucket}/build/.cnclip-build.lock once it is gone)")
        assert not [k for k in objects(s3_bucket) if k.startswith("build/work/")]
    finally:
        holder.communicate("")
    assert holder.returncode == 0 and not storage.exists(f"{s3_bucket}/build/.cnclip-build.lock")


def test_a_lock_from_another_host_is_never_taken_over(make_recipe, sources, s3_bucket):
    from cnclip.corpus.pipeline import run_text
    from cnclip.corpus.runtime.ownership import BuildLockedError

    storage.write_bytes(f"{s3_bucket}/build/.cnclip-build.lock", _lock_record("other-host", 1))
    with pytest.raises(BuildLockedError, match=r"another build \(PID 1 on other-host, since 2026-01-01T00:00:00Z\)"):
        run_text(remote_recipe(make_recipe, sources, s3_bucket))
    assert json.loads(storage.read_bytes(f"{s3_bucket}/build/.cnclip-build.lock"))["token"] == "theirs"


def test_a_lock_left_by_a_killed_build_of_this_host_is_taken_over(make_recipe, sources, s3_bucket):
    import socket
    import subprocess
    import sys

    from cnclip.corpus.pipeline import run_text

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    storage.write_bytes(f"{s3_bucket}/build/.cnclip-build.lock", _lock_record(socket.gethostname(), int(dead.stdout)))
    assert run_text(remote_recipe(make_recipe, sources, s3_bucket))["accepted"] == 7
    assert not storage.exists(f"{s3_bucket}/build/.cnclip-build.lock")


def test_only_one_of_two_exclusive_creates_wins(s3_bucket):
    path = f"{s3_bucket}/x/lock"
    assert [storage.create_exclusive(path, b"a"), storage.create_exclusive(path, b"b")] == [True, False]
    assert storage.read_bytes(path) == b"a"


def test_an_interrupted_build_on_s3_resumes_to_the_same_corpus(make_recipe, sources, s3_bucket, tmp_path,
                                                               monkeypatch):
    """Killed after the first part of the text stage (a half-written part left without its
    marker), then after the first shard: each rerun keeps what was committed and ends with the
    local build's corpus."""
    from cnclip.corpus.stages import shard, text

    build(make_recipe(sources, shard={"samples_per_shard": 2}), show_funnel=False)
    recipe = remote_recipe(make_recipe, sources, s3_bucket)

    def crash_after(module, name: str, calls: int):
        real, done = getattr(module, name), []

        def crashing(task):
            if len(done) == calls:
                raise KeyboardInterrupt("killed")
            done.append(task)
            return real(task)

        monkeypatch.setattr(module, name, crashing)
        return done

    crash_after(text, "normalize_part", 1)
    with pytest.raises(KeyboardInterrupt):
        build(recipe, show_funnel=False)
    normalized = f"{s3_bucket}/build/work/text/normalized"
    assert [p.rsplit("/", 1)[1] for p in storage.list_files(normalized)] == [
        ".000-00000.parquet.committed", "000-00000.parquet"]
    storage.write_bytes(f"{normalized}/000-00001.parquet", b"half a part")  # a writer cut short
    first = boto3.client("s3").head_object(Bucket=s3_bucket.removeprefix("s3://"),
                                           Key="build/work/text/normalized/000-00000.parquet")["ETag"]
    monkeypatch.undo()
    crash_after(shard, "write_shard", 1)
    with pytest.raises(KeyboardInterrupt):
        build(recipe, show_funnel=False)
    assert boto3.client("s3").head_object(Bucket=s3_bucket.removeprefix("s3://"),
                                          Key="build/work/text/normalized/000-00000.parquet")["ETag"] == first
    assert [p.rsplit("/", 1)[1] for p in storage.list_files(f"{s3_bucket}/corpus/shards")] == [
        ".00000.tar.committed", "00000.tar"]
    monkeypatch.undo()
    funnel = build(recipe, show_funnel=False)
    assert funnel["samples"] == 5
    assert_same_corpus(objects(s3_bucket), tmp_path)
    assert published_problems(f"{s3_bucket}/manifests") == []


def test_clean_removes_the_work_files_on_s3_and_not_the_users(make_recipe, sources, s3_bucket):
    from cnclip.corpus.pipeline import clean, run_text

    recipe = remote_recipe(make_recipe, sources, s3_bucket)
    run_text(recipe)
    storage.write_bytes(f"{s3_bucket}/notes.txt", b"mine")
    assert any(k.startswith("build/work/text/") for k in objects(s3_bucket))
    clean(recipe)
    assert sorted(objects(s3_bucket)) == ["notes.txt"]


@pytest.mark.parametrize(("folders", "message"), [
    ({"output_dir": "out", "manifest_dir": "manifests"}, "work_dir is only for a URL output_dir"),
    ({"output_dir": "out"}, "work_dir is a URL: output_dir must be one too"),
    ({"sources": [{"name": "web", "kind": "sample_web", "images": 10}]},
     r"work_dir is a URL: sources\[0\] \(sample_web\) writes its pages or images to a local folder"),
])
def test_a_url_work_dir_needs_url_outputs_and_sources_read_as_they_are(folders, message):
    from cnclip.corpus.recipe import RecipeError, parse_recipe

    data = {"name": "t", "output_dir": "s3://b/out", "manifest_dir": "s3://b/m", "work_dir": "s3://b/build",
            "sources": [{"name": "m", "kind": "metadata", "path": "s3://b/in/*.parquet"}], **folders}
    with pytest.raises(RecipeError, match=message):
        parse_recipe(data, "t")


def test_a_url_work_dir_lays_the_build_out_on_the_urls():
    from cnclip.corpus.recipe import parse_recipe
    from cnclip.corpus.runtime.layout import BuildLayout

    recipe = parse_recipe({"name": "t", "output_dir": "s3://b/out/", "manifest_dir": "s3://b/m",
                           "work_dir": "s3://b/build/", "sources": [
                               {"name": "m", "kind": "metadata", "path": "s3://b/in/*.parquet"}]}, "t")
    layout = BuildLayout.of(recipe)
    assert recipe.work_dir == "s3://b/build" and layout.remote and layout.lock_root == "s3://b/build"
    assert (layout.ingest_dir, layout.shard_plan, layout.shards_dir, layout.samples_dir) == (
        "s3://b/build/work/ingest", "s3://b/build/work/shard/plan.parquet", "s3://b/out/shards", "s3://b/m/samples")


def test_retry_failed_on_s3_fetches_only_transient_failures(make_recipe, tmp_path, s3_bucket):
    """--retry-failed on a URL work_dir: the plans and img2dataset's parts are objects; a new
    round's parts are numbered after the first's and the attempts table holds the latest."""
    from cnclip.corpus import run_download
    from loopback_routes import RouteServer, jpeg_bytes

    calls = {"n": 0}

    def busy_then_ok(hit):
        calls["n"] += 1
        return (429, {"Retry-After": "1"}, b"slow down") if calls["n"] == 1 else (
            200, {"Content-Type": "image/jpeg"}, jpeg_bytes(64, (200, 200, 30)))

    routes = {"/ok.jpg": (200, {"Content-Type": "image/jpeg"}, jpeg_bytes(64, (10, 10, 200))),
              "/busy.jpg": busy_then_ok, "/gone.jpg": (404, {}, b"")}
    with RouteServer(routes) as site:
        pl.DataFrame({"url": [f"{site.base}/{p}" for p in ("ok.jpg", "busy.jpg", "gone.jpg")],
                      "caption": ["第一张正常的图片", "第二张先限流的图片", "第三张已删除的图片"]}
                     ).write_parquet(tmp_path / "list.parquet")
        recipe = remote_recipe(make_recipe, [{"name": "m", "kind": "metadata", "path": str(tmp_path / "list.parquet")}],
                               s3_bucket)
        assert build(recipe, show_funnel=False)["samples"] == 1
        summary = run_download(recipe, retry_failed=True)
        funnel = build(recipe, show_funnel=False)
        hits = site.paths()
    assert summary["retried"] == 1 and funnel["samples"] == 2
    assert (hits.count("/ok.jpg"), hits.count("/busy.jpg"), hits.count("/gone.jpg")) == (1, 2, 1)
    download = [p.rsplit("/", 1)[1] for p in storage.list_files(f"{s3_bucket}/build/work/download")]
    assert {"00000.tar", "00001.tar", "00000_stats.json", "00001_stats.json", "attempts.parquet"} <= set(download)
    rejected = pl.concat([pl.read_parquet(io.BytesIO(data)) for key, data in objects(s3_bucket, "manifests/rejected/").items()
                          if key.endswith(".parquet") and not key.rsplit("/", 1)[1].startswith(".")], how="diagonal_relaxed")
    assert rejected["reason"].to_list() == ["download:failed_to_download"]
