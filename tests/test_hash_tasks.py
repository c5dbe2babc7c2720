"""The hash stage's task list: one task per download part naming only paths and the part's number;
each task reads its own members (successes' tar keys and uids) from the members table the engine
wrote, so the driver never holds a row's key. On the local engine and on Spark the same parts."""

import io
import tarfile

import polars as pl
import pytest
from PIL import Image

from cnclip.corpus.manifests.schemas import HASH_MEMBERS
from cnclip.corpus.ops.phash import phash_bytes
from cnclip.corpus.runtime.engine import LocalEngine
from cnclip.corpus.stages.download_attempts import write_attempts
from cnclip.corpus.stages.hash import HashTask, members_path, run_hash_stage
from spark_session import spark  # noqa: F401 (the session fixture)


def jpeg(colour) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (40, 32), colour).save(buffer, "JPEG")
    return buffer.getvalue()


def results(folder, part, rows):
    """img2dataset's per-part result file for rows of (uid, key, status)."""
    n = len(rows)
    pl.DataFrame({"uid": [r[0] for r in rows], "key": [r[1] for r in rows], "status": [r[2] for r in rows],
                  "error_message": [None if r[2] == "success" else "HTTP Error 503: Service Unavailable" for r in rows],
                  "width": [32] * n, "height": [32] * n, "original_width": [40] * n, "original_height": [32] * n,
                  "sha256": [f"s{r[0]}" for r in rows]}).write_parquet(folder / f"{part:05d}.parquet")


def tar(path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as out:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            out.addfile(info, io.BytesIO(data))


@pytest.fixture
def download(tmp_path):
    """Part 0: uid 1 stored, uid 2 failed (its retry in part 12 stored it), and a stray image under
    the key uid 2 has in part 12; part 5: nothing stored (no tar); part 12: uid 2."""
    folder = tmp_path / "download"
    folder.mkdir()
    red, blue, green = jpeg((200, 20, 20)), jpeg((20, 20, 200)), jpeg((20, 200, 20))
    results(folder, 0, [(1, "000000000", "success"), (2, "000000001", "failed_to_download")])
    results(folder, 5, [(3, "000050000", "failed_to_download")])
    results(folder, 12, [(2, "000120000", "success")])
    tar(folder / "00000.tar", {"000000000.jpg": red, "000000000.txt": b"x", "000120000.jpg": green})
    tar(folder / "00012.tar", {"000120000.jpg": blue})
    write_attempts(folder)
    return folder, {1: red, 2: blue}


class Recording(LocalEngine):
    def __init__(self):
        super().__init__(1)
        self.tasks = []

    def map_parts(self, fn, parts, description, processes=None):
        self.tasks += list(parts)
        return super().map_parts(fn, parts, description, processes)


def hashes(folder):
    return {p.name: pl.read_parquet(p).rows() for p in sorted(folder.glob("*.parquet"))}


def expected(images):
    return {"00000.parquet": [(1, int(phash_bytes([images[1]])[0]))], "00005.parquet": [],
            "00012.parquet": [(2, int(phash_bytes([images[2]])[0]))]}


def test_each_task_reads_its_own_members_and_the_driver_ships_none(download, tmp_path):
    folder, images = download
    engine = Recording()
    assert run_hash_stage(folder, tmp_path / "hash", engine=engine) == {"parts": 3}
    assert engine.tasks == [HashTask(folder / f"{p:05d}.tar", members_path(tmp_path / "hash"),
                                     tmp_path / "hash" / f"{p:05d}.parquet", p) for p in (0, 5, 12)]
    # The stray image in part 0 under uid 2's part-12 key is not part 0's: uid 2 is hashed from part 12.
    assert hashes(tmp_path / "hash") == expected(images)
    # The members table is a declared work file of the stage (HASH_MEMBERS), kept for a rerun's reading.
    HASH_MEMBERS.check_file(members_path(tmp_path / "hash"))


def test_the_members_table_is_sorted_by_part_while_the_tasks_read_it(download, tmp_path):
    folder, _ = download
    seen = []

    class Peeking(LocalEngine):
        def map_parts(self, fn, parts, description, processes=None):
            seen.append(pl.read_parquet(members_path(tmp_path / "hash")).rows())
            return super().map_parts(fn, parts, description, processes)

    run_hash_stage(folder, tmp_path / "hash", engine=Peeking(1))
    assert seen == [[(0, "000000000", 1), (12, "000120000", 2)]]  # sorted by part: a task skips the rest


def test_a_rerun_hashes_only_missing_parts_from_a_fresh_members_table(download, tmp_path):
    folder, images = download
    run_hash_stage(folder, tmp_path / "hash")
    (tmp_path / "hash" / "00012.parquet").unlink()
    members_path(tmp_path / "hash").write_bytes(b"not parquet")  # as a killed run may leave it: rewritten
    engine = Recording()
    run_hash_stage(folder, tmp_path / "hash", engine=engine)
    assert [task.part for task in engine.tasks] == [12]
    assert hashes(tmp_path / "hash") == expected(images)
    assert pl.read_parquet(members_path(tmp_path / "hash")).rows() == [(0, "000000000", 1), (12, "000120000", 2)]


@pytest.mark.spark
def test_spark_writes_the_same_members_and_hash_parts(download, tmp_path, spark):
    from cnclip.corpus.runtime.spark_engine import SparkEngine

    folder, images = download
    run_hash_stage(folder, tmp_path / "local")
    run_hash_stage(folder, tmp_path / "spark", engine=SparkEngine(spark))
    assert hashes(tmp_path / "spark") == hashes(tmp_path / "local") == expected(images)
    assert pl.read_parquet(members_path(tmp_path / "spark")).equals(pl.read_parquet(members_path(tmp_path / "local")))
