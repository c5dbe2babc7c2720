"""Storage through fsspec (runtime/storage.py) and part commits (runtime/commit.py), on a local
folder and on s3:// served by moto on 127.0.0.1: a part is trusted only once it is whole."""

import io
import json
import tarfile

import boto3
import polars as pl
import pytest

from cnclip.corpus.runtime import storage
from cnclip.corpus.runtime.commit import (
    committed_parts,
    committed_path,
    discard_uncommitted,
    is_committed,
    marker_of,
    remove_part,
    write_parquet_part,
    write_part,
)
from s3_server import loopback_only, s3, s3_bucket  # noqa: F401


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    """A folder to write under: a local one, or a fresh bucket on the test S3 server."""
    if request.param == "local":
        return str(tmp_path / "store")
    return request.getfixturevalue("s3_bucket") + "/store"


def objects(bucket_url: str) -> list[str]:
    """Every key in a bucket, as S3 itself lists it (not through the code under test)."""
    listed = boto3.client("s3").list_objects_v2(Bucket=bucket_url.removeprefix("s3://"))
    return sorted(item["Key"] for item in listed.get("Contents", []))


def crashed_write(url: str, data: bytes) -> None:
    """A part whose writer died after its bytes, before its commit: the object alone."""
    bucket, key = url.removeprefix("s3://").split("/", 1)
    boto3.client("s3").put_object(Bucket=bucket, Key=key, Body=data)


def test_files_round_trip_list_and_remove(root):
    storage.write_text(storage.join(root, "a.json"), '{"a": 1}')
    storage.write_bytes(storage.join(root, "sub", "b.bin"), b"\x00\x01")
    assert storage.read_text(storage.join(root, "a.json")) == '{"a": 1}'
    assert storage.read_bytes(storage.join(root, "sub", "b.bin")) == b"\x00\x01"
    assert storage.exists(storage.join(root, "a.json")) and not storage.exists(storage.join(root, "c.json"))
    assert storage.is_dir(storage.join(root, "sub"))
    assert storage.list_files(root) == [storage.join(root, "a.json")]
    assert storage.list_files(root, recursive=True) == [storage.join(root, "a.json"),
                                                        storage.join(root, "sub", "b.bin")]
    assert storage.list_files(storage.join(root, "*.json")) == [storage.join(root, "a.json")]
    with storage.open_file(storage.join(root, "sub", "b.bin")) as handle:
        assert handle.read() == b"\x00\x01"
    storage.remove(storage.join(root, "sub"))
    storage.remove(storage.join(root, "never-there"))  # no error
    assert storage.list_files(root, recursive=True) == [storage.join(root, "a.json")]


def test_a_remote_part_without_its_marker_is_not_read(s3_bucket):
    folder = f"{s3_bucket}/parts"
    write_part(f"{folder}/000.parquet", b"whole")
    crashed_write(f"{folder}/001.parquet", b"half")
    assert objects(s3_bucket) == ["parts/.000.parquet.committed", "parts/000.parquet", "parts/001.parquet"]
    assert committed_parts(folder, ".parquet") == [f"{folder}/000.parquet"]
    assert is_committed(f"{folder}/000.parquet") and not is_committed(f"{folder}/001.parquet")
    write_part(f"{folder}/001.parquet", b"whole now")
    assert committed_parts(folder, ".parquet") == [f"{folder}/000.parquet", f"{folder}/001.parquet"]
    assert storage.read_bytes(f"{folder}/001.parquet") == b"whole now"


def test_a_marker_does_not_vouch_for_a_rewrite_that_crashed(s3_bucket):
    part = f"{s3_bucket}/parts/000.parquet"
    write_part(part, b"first")
    with pytest.raises(RuntimeError), committed_path(part) as staged:
        staged.write_bytes(b"sec")
        raise RuntimeError("writer died")
    assert not is_committed(part)
    assert committed_parts(f"{s3_bucket}/parts") == []
    assert ".000.parquet.committed" not in " ".join(objects(s3_bucket))


def test_a_local_rewrite_that_crashed_leaves_the_previous_part(tmp_path):
    part = tmp_path / "parts" / "000.parquet"
    write_part(part, b"first")
    with pytest.raises(RuntimeError), committed_path(part) as staged:
        staged.write_bytes(b"sec")
        raise RuntimeError("writer died")
    assert part.read_bytes() == b"first"
    assert sorted(p.name for p in part.parent.iterdir()) == ["000.parquet"]  # no marker, no temporary
    assert committed_parts(part.parent) == [str(part)]


def test_discarding_uncommitted_keeps_exactly_the_whole_parts(s3_bucket):
    folder = f"{s3_bucket}/parts"
    write_part(f"{folder}/000.tar", b"whole")
    crashed_write(f"{folder}/001.tar", b"half")
    crashed_write(marker_of(f"{folder}/002.tar"), b'{"size": 4}')  # a marker whose part was removed
    discard_uncommitted(folder)
    assert objects(s3_bucket) == ["parts/.000.tar.committed", "parts/000.tar"]


def test_removing_a_part_uncommits_it(root):
    part = storage.join(root, "000.bin")
    write_part(part, b"x")
    remove_part(part)
    assert committed_parts(root) == [] and not storage.exists(part) and not storage.exists(marker_of(part))


def test_a_parquet_part_written_remotely_reads_back_row_for_row(s3_bucket):
    frame = pl.DataFrame({"uid": [3, 1, 2], "caption": ["猫", "狗", None]})
    write_parquet_part(frame.lazy(), f"{s3_bucket}/samples/part-0.parquet")
    assert committed_parts(f"{s3_bucket}/samples", ".parquet") == [f"{s3_bucket}/samples/part-0.parquet"]
    back = pl.read_parquet(io.BytesIO(storage.read_bytes(f"{s3_bucket}/samples/part-0.parquet")))
    assert back.equals(frame)


def test_an_eval_set_on_s3_hashes_as_its_local_copy(s3_bucket, tmp_path):
    """Decontamination must not depend on where the evaluation set lives: a remote folder (read
    recursively), a remote tar glob and a remote pHash list give the local copy's ids and hashes."""
    from cnclip.corpus.ops.eval_hashes import EvalSetError, load_eval_hashes, write_eval_hashes
    from cnclip.corpus.recipe import ImageSettings
    from loopback_routes import jpeg_bytes

    images = {"a.jpg": jpeg_bytes(40, (200, 30, 30)), "sub/b.png": jpeg_bytes(56, (30, 30, 200))}
    local = tmp_path / "evals"
    for name, data in images.items():
        (local / name).parent.mkdir(parents=True, exist_ok=True)
        (local / name).write_bytes(data)
        crashed_write(f"{s3_bucket}/evals/{name}", data)  # plain objects, as a user uploads them
    crashed_write(f"{s3_bucket}/evals/notes.txt", b"not an image")
    with tarfile.open(tmp_path / "e-0.tar", "w") as tar:
        tar.add(local / "a.jpg", "k0.jpg")
    crashed_write(f"{s3_bucket}/tars/e-0.tar", (tmp_path / "e-0.tar").read_bytes())
    settings = ImageSettings(size=32)
    write_eval_hashes(str(local), tmp_path / "list.parquet", settings)
    crashed_write(f"{s3_bucket}/list.parquet", (tmp_path / "list.parquet").read_bytes())

    def hashes(path):
        return load_eval_hashes([path], settings)["phash"].to_list()

    def ids(path):
        return load_eval_hashes([path], settings)["id"].str.replace(f"{path}:", "", literal=True).to_list()

    assert ids(f"{s3_bucket}/evals") == ids(str(local)) == ["a.jpg", "sub/b.png"]
    assert hashes(f"{s3_bucket}/evals") == hashes(str(local))
    assert ids(f"{s3_bucket}/tars/e-*.tar") == ids(str(tmp_path / "e-*.tar")) == ["e-0.tar/k0"]
    assert hashes(f"{s3_bucket}/tars/e-*.tar") == hashes(str(local))[:1]
    assert hashes(f"{s3_bucket}/list.parquet") == hashes(str(local))
    with pytest.raises(EvalSetError, match=f"^{s3_bucket}/none-\\*.tar: no such folder, tar or glob of tars$"):
        load_eval_hashes([f"{s3_bucket}/none-*.tar"], settings)


def test_the_s3_tests_cannot_reach_any_other_address(s3_bucket, loopback_only):
    """The guard the S3 fixtures hold: instance metadata and a real endpoint are refused."""
    import socket

    for address in (("169.254.169.254", 80), ("52.216.0.1", 443)):
        with socket.socket() as sock, pytest.raises(ConnectionRefusedError, match="loopback only"):
            sock.connect(address)
    assert loopback_only == [("169.254.169.254", 80), ("52.216.0.1", 443)]
    loopback_only.clear()
    write_part(f"{s3_bucket}/x.bin", b"x")  # the test server itself is reachable
    assert storage.read_bytes(f"{s3_bucket}/x.bin") == b"x"


@pytest.fixture
def remote_recipe(make_recipe, tmp_path, s3_bucket):
    """A recipe publishing to the test bucket (work under tmp_path), its one source local."""
    pl.DataFrame({"url": ["http://127.0.0.1/a.jpg"], "caption": ["一只猫在草地上睡觉"]}).write_parquet(tmp_path / "in.parquet")

    def make(name="test", output="corpus", manifests="manifests"):
        return make_recipe([{"name": "m", "kind": "metadata", "path": str(tmp_path / "in.parquet")}], name=name,
                           output_dir=f"{s3_bucket}/{output}", manifest_dir=f"{s3_bucket}/{manifests}",
                           work_dir=str(tmp_path / "scratch"))

    return make


def test_a_prefix_holding_the_users_files_is_refused_before_anything_is_written(remote_recipe, s3_bucket, tmp_path):
    from cnclip.corpus.pipeline import run_text
    from cnclip.corpus.runtime.ownership import OwnershipError

    crashed_write(f"{s3_bucket}/manifests/notes.txt", b"mine")
    with pytest.raises(OwnershipError) as refused:
        run_text(remote_recipe())
    assert str(refused.value) == (f"{s3_bucket}/manifests: already holds files this build did not write "
                                  "(notes.txt); choose an empty or new folder")
    assert objects(s3_bucket) == ["manifests/notes.txt"] and not (tmp_path / "scratch").exists()


def test_another_recipe_cannot_publish_into_a_claimed_prefix(remote_recipe, s3_bucket):
    from cnclip.corpus.pipeline import run_text
    from cnclip.corpus.runtime.ownership import OwnershipError

    run_text(remote_recipe())
    assert objects(s3_bucket) == ["corpus/.cnclip-build.json", "manifests/.cnclip-build.json"]
    with pytest.raises(OwnershipError, match=f"^{s3_bucket}/corpus: holds the build of recipe 'test', not 'other'; "):
        run_text(remote_recipe(name="other"))
    run_text(remote_recipe())  # the same recipe again: its own prefixes


def test_clean_removes_what_was_published_and_not_the_users_files(remote_recipe, s3_bucket, tmp_path):
    from cnclip.corpus.pipeline import clean, run_text

    recipe = remote_recipe()
    run_text(recipe)
    write_part(f"{s3_bucket}/corpus/shards/00000.tar", b"tar")
    write_part(f"{s3_bucket}/manifests/samples/00000.parquet", b"part")
    storage.write_text(f"{s3_bucket}/manifests/funnel.json", "{}")
    crashed_write(f"{s3_bucket}/corpus/notes.txt", b"added by the user later")
    clean(recipe)
    assert objects(s3_bucket) == ["corpus/notes.txt"]
    assert not (tmp_path / "scratch").exists()


def test_a_manifest_prefix_inside_the_output_prefix_is_the_builds_own(remote_recipe, s3_bucket):
    from cnclip.corpus.pipeline import run_text

    run_text(remote_recipe(manifests="corpus/manifests"))
    assert objects(s3_bucket) == ["corpus/.cnclip-build.json", "corpus/manifests/.cnclip-build.json"]


def staged_build(layout, samples_parts: int) -> None:
    """What the shard stage leaves locally, in miniature: a tar, its sizes, manifest parts, the
    funnel and checksums.json recording them."""
    from cnclip.corpus.manifests.integrity import write_checksums

    layout.shards_dir.mkdir(parents=True, exist_ok=True)
    (layout.shards_dir / "00000.tar").write_bytes(b"tar bytes")
    (layout.shards_dir / "sizes.json").write_text('{"00000.tar": 1}')
    published = [layout.shards_dir / "00000.tar", layout.shards_dir / "sizes.json"]
    for index in range(samples_parts):
        part = layout.samples_dir / f"{index:05d}.parquet"
        part.parent.mkdir(parents=True, exist_ok=True)
        pl.DataFrame({"uid": [index]}).write_parquet(part)
        published.append(part)
    layout.funnel_path.write_text(json.dumps({"shards_dir": str(layout.shards_dir.resolve()), "samples": 1}))
    write_checksums(layout.manifest_dir, layout.shards_dir, [*published, layout.funnel_path])


def test_manifests_published_beside_local_shards_name_them_and_verify(make_recipe, tmp_path, s3_bucket):
    """manifest_dir on S3, output_dir local: only the manifests are uploaded; the record names the
    local shards, and a changed local tar is a problem of the published corpus."""
    from cnclip.corpus.runtime.layout import BuildLayout
    from cnclip.corpus.runtime.publish import publish, published_problems

    recipe = make_recipe([{"name": "m", "kind": "metadata", "path": f"{s3_bucket}/in.parquet"}],
                         manifest_dir=f"{s3_bucket}/manifests", work_dir=str(tmp_path / "scratch"))
    layout = BuildLayout.of(recipe)
    assert layout.manifest_dir == tmp_path / "scratch" / "manifests" and layout.output_dir == tmp_path / "out"
    staged_build(layout, samples_parts=1)
    assert publish(recipe)["uploaded"] == 2  # samples/00000.parquet and funnel.json
    assert objects(s3_bucket) == ["manifests/.funnel.json.committed", "manifests/checksums.json",
                                  "manifests/funnel.json", "manifests/samples/.00000.parquet.committed",
                                  "manifests/samples/00000.parquet"]
    record = json.loads(storage.read_text(f"{s3_bucket}/manifests/checksums.json"))
    assert record["shards_dir"] == str(layout.shards_dir.resolve())
    assert json.loads(storage.read_text(f"{s3_bucket}/manifests/funnel.json"))["shards_dir"] == record["shards_dir"]
    assert published_problems(f"{s3_bucket}/manifests") == []
    (layout.shards_dir / "00000.tar").write_bytes(b"tar bytez")
    problems = published_problems(f"{s3_bucket}/manifests")
    assert len(problems) == 1 and problems[0].startswith(f"{layout.shards_dir.resolve()}/00000.tar: 9 bytes")


def test_a_republish_removes_its_own_stale_parts_and_reports_foreign_ones(make_recipe, tmp_path, s3_bucket, capsys):
    from cnclip.corpus.runtime.layout import BuildLayout
    from cnclip.corpus.runtime.publish import publish, published_problems

    recipe = make_recipe([{"name": "m", "kind": "metadata", "path": f"{s3_bucket}/in.parquet"}],
                         output_dir=f"{s3_bucket}/corpus", manifest_dir=f"{s3_bucket}/manifests",
                         work_dir=str(tmp_path / "scratch"))
    layout = BuildLayout.of(recipe)
    staged_build(layout, samples_parts=2)
    assert publish(recipe)["uploaded"] == 5
    crashed_write(f"{s3_bucket}/manifests/samples/99999.parquet", b"someone else's")
    (layout.samples_dir / "00001.parquet").unlink()
    staged_build(layout, samples_parts=1)
    summary = publish(recipe)
    assert (summary["uploaded"], summary["unchanged"], summary["removed"]) == (0, 4, 1)
    assert "manifests/samples/00001.parquet" not in objects(s3_bucket)
    assert "manifests/samples/99999.parquet" in objects(s3_bucket)
    assert (f"{s3_bucket}/manifests/samples/99999.parquet: not part of this corpus; remove it"
            in capsys.readouterr().err)
    assert published_problems(f"{s3_bucket}/manifests") == []  # an uncommitted part is no part
