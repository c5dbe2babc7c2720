"""Stage fingerprints of remote inputs (s3:// on a moto server on 127.0.0.1) and of local globs:
every file an input names is recorded with its size and version, so a rewritten, added or
removed part redoes the stages that read it."""

import io
import os

import boto3
import polars as pl
import pytest
import s3fs

from cnclip.corpus.pipeline import STAGE_NAMES as STAGES
from cnclip.corpus.pipeline import run_text, stage_states
from cnclip.corpus.runtime.fingerprints import eval_listing, input_listing
from s3_server import loopback_only, s3, s3_bucket  # noqa: F401


def put(url: str, data: bytes) -> None:
    """Write an object as another machine would: past this process's fsspec listing cache."""
    bucket, key = url.removeprefix("s3://").split("/", 1)
    boto3.client("s3").put_object(Bucket=bucket, Key=key, Body=data)


def parquet(captions: list[str]) -> bytes:
    buffer = io.BytesIO()
    urls = [f"http://127.0.0.1/{index}.jpg" for index in range(len(captions))]
    pl.DataFrame({"url": urls, "caption": captions}).write_parquet(buffer)
    return buffer.getvalue()


def etag(url: str) -> str:
    return s3fs.S3FileSystem().info(url.removeprefix("s3://"))["ETag"]


def test_a_remote_glob_lists_every_part_with_its_size_and_etag(s3_bucket):
    put(f"{s3_bucket}/in/m-0.parquet", b"abc")
    put(f"{s3_bucket}/in/m-1.parquet", b"defgh")
    put(f"{s3_bucket}/in/notes.txt", b"not matched")
    put(f"{s3_bucket}/in/deeper/m-2.parquet", b"not matched either: * stops at /")
    listing = input_listing([f"{s3_bucket}/in/m-*.parquet", f"{s3_bucket}/in/none-*.parquet"])
    assert listing == [
        [f"{s3_bucket}/in/m-0.parquet", 3, etag(f"{s3_bucket}/in/m-0.parquet")],
        [f"{s3_bucket}/in/m-1.parquet", 5, etag(f"{s3_bucket}/in/m-1.parquet")],
        [f"{s3_bucket}/in/none-*.parquet", None, None],
    ]


def test_a_local_glob_lists_every_match(tmp_path):
    (tmp_path / "a-0.csv").write_bytes(b"12")
    (tmp_path / "a-1.csv").write_bytes(b"345")
    (tmp_path / "a-dir.csv").mkdir()  # a folder the glob matches is not a file it reads
    names = [str(tmp_path / "a-0.csv"), str(tmp_path / "a-1.csv")]
    assert input_listing([str(tmp_path / "a-*.csv")]) == [
        [name, os.stat(name).st_size, os.stat(name).st_mtime_ns] for name in names]


@pytest.fixture
def remote_prints(make_recipe):
    def make(path, eval_images=()):
        recipe = make_recipe([{"name": "m", "kind": "metadata", "path": path}],
                             dedup={"eval_images": list(eval_images)})
        return {stage: state.fingerprint for stage, state in stage_states(recipe).items()}

    return make


def changed(before, after):
    return [stage for stage in STAGES if before[stage] != after[stage]]


def test_a_rewritten_added_or_removed_remote_part_redoes_everything(remote_prints, s3_bucket):
    pattern = f"{s3_bucket}/in/m-*.parquet"
    put(f"{s3_bucket}/in/m-0.parquet", parquet(["一只猫在草地上"]))
    before = remote_prints(pattern)
    assert remote_prints(pattern) == before  # nothing changed, nothing to redo
    put(f"{s3_bucket}/in/m-0.parquet", parquet(["一只狗在草地上"]))  # same size, other bytes
    rewritten = remote_prints(pattern)
    assert changed(before, rewritten) == list(STAGES)
    put(f"{s3_bucket}/in/m-1.parquet", parquet(["两只鸟在树上"]))
    added = remote_prints(pattern)
    assert changed(rewritten, added) == list(STAGES)
    boto3.client("s3").delete_object(Bucket=s3_bucket.removeprefix("s3://"), Key="in/m-1.parquet")
    assert remote_prints(pattern) == rewritten


def test_a_changed_file_inside_a_remote_eval_folder_redoes_dedup(remote_prints, s3_bucket):
    put(f"{s3_bucket}/in/m-0.parquet", parquet(["一只猫在草地上"]))
    put(f"{s3_bucket}/evals/a.jpg", b"a" * 10)
    put(f"{s3_bucket}/evals/sub/b.jpg", b"b" * 10)
    source, evals = f"{s3_bucket}/in/m-0.parquet", [f"{s3_bucket}/evals"]
    before = remote_prints(source, evals)
    put(f"{s3_bucket}/evals/sub/b.jpg", b"c" * 10)  # two levels down, same size
    after = remote_prints(source, evals)
    assert changed(before, after) == ["dedup", "shard"]
    put(f"{s3_bucket}/evals/sub/deeper/c.jpg", b"c")
    assert changed(after, remote_prints(source, evals)) == ["dedup", "shard"]


def test_a_remote_eval_folder_lists_its_files_recursively(s3_bucket):
    put(f"{s3_bucket}/evals/a.jpg", b"a" * 10)
    put(f"{s3_bucket}/evals/sub/b.jpg", b"b" * 4)
    put(f"{s3_bucket}/evals-other/c.jpg", b"not in the set: a sibling with the same prefix")
    missing = f"{s3_bucket}/no-such-set"
    assert eval_listing([f"{s3_bucket}/evals", missing]) == [
        [f"{s3_bucket}/evals", [[f"{s3_bucket}/evals/a.jpg", 10, etag(f"{s3_bucket}/evals/a.jpg")],
                                [f"{s3_bucket}/evals/sub/b.jpg", 4, etag(f"{s3_bucket}/evals/sub/b.jpg")]]],
        [missing, [[missing, None, None]]],
    ]


def test_a_rerun_after_a_remote_part_changed_ingests_it_again(make_recipe, s3_bucket):
    """Read from s3:// through fsspec, skipped while unchanged, redone (not resumed from the old
    parts) once a part is rewritten."""
    put(f"{s3_bucket}/in/m-0.parquet", parquet(["一只猫在草地上睡觉"]))
    put(f"{s3_bucket}/in/m-1.parquet", parquet(["一只狗在公园里奔跑"]))
    recipe = make_recipe([{"name": "m", "kind": "metadata", "path": f"{s3_bucket}/in/m-*.parquet"}])
    assert run_text(recipe) == {"accepted": 2, "rejected": 0}
    accepted = recipe.output_dir / "work" / "text" / "accepted"
    first = sorted(accepted.glob("*.parquet"))
    stamps = [part.stat().st_mtime_ns for part in first]
    assert run_text(recipe) == {"accepted": 2, "rejected": 0}
    assert [part.stat().st_mtime_ns for part in sorted(accepted.glob("*.parquet"))] == stamps  # skipped
    put(f"{s3_bucket}/in/m-1.parquet", parquet(["两只鸟在树上唱歌", "三条鱼在水里游泳"]))
    assert run_text(recipe) == {"accepted": 3, "rejected": 0}
    captions = pl.read_parquet(accepted / "*.parquet")["caption"].sort().to_list()
    assert captions == sorted(["一只猫在草地上睡觉", "两只鸟在树上唱歌", "三条鱼在水里游泳"])


def test_a_part_rewritten_by_another_writer_is_seen_within_one_process(s3_bucket):
    """fsspec caches listings per filesystem: a driver process that lists its inputs twice (a
    long-lived notebook, `cnclip` called as a library) must not fingerprint from the first."""
    put(f"{s3_bucket}/in/m-0.parquet", b"abc")
    inputs = [f"{s3_bucket}/in", f"{s3_bucket}/in/m-0.parquet"]
    before = input_listing(inputs)
    put(f"{s3_bucket}/in/m-0.parquet", b"abcd")
    after = input_listing(inputs)
    assert [entry[1] for entry in before] == [3, 3]
    assert [entry[1] for entry in after] == [4, 4]
