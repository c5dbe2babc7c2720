"""Ingest on the Spark engine: every input file is a task (read, then numbered after the counts
of the files before it), the driver reads no row (spark_driver.py), and the parts, uids, rows and
report are the local engine's, a bad file reported and skipped with the same line, a text file
with a bad byte read line by line in its task. A rerun redoes only a part that is missing."""

import polars as pl
import pytest

from cnclip.corpus.stages.ingest import ingest
from spark_driver import Recording, driver_reads_no_rows
from spark_session import spark  # noqa: F401 (the session fixture)

pytestmark = [pytest.mark.spark]


def inputs(folder):
    folder.mkdir()
    for i in range(3):  # 2, 3 and 4 rows
        pl.DataFrame({"url": [f"http://127.0.0.1/{i}-{j}.jpg" for j in range(i + 2)],
                      "caption": [f"第{i}个文件的第{j}张图片" for j in range(i + 2)]}).write_parquet(folder / f"{i}.parquet")
    (folder / "1b.parquet").write_bytes(b"not a parquet file")  # sorted between 1 and 2
    (folder / "3.csv").write_bytes(b"url,caption\nhttp://127.0.0.1/c0.jpg,\xe7\xac\xac\xe4\xb8\x80\n"
                                   b"http://127.0.0.1/c1.jpg,caf\xff\nhttp://127.0.0.1/c2.jpg,ok\n")
    return [{"name": "m", "kind": "metadata", "path": str(folder / "*")},
            {"name": "again", "kind": "metadata", "path": str(folder / "2.parquet")}]


def parts(out):
    return {p.name: pl.read_parquet(p) for p in sorted((out / "work" / "ingest").glob("*.parquet"))}


def test_ingest_files_are_tasks_with_the_local_engines_uids(spark, make_recipe, tmp_path):
    sources = inputs(tmp_path / "in")
    local = make_recipe(sources)
    on_spark = make_recipe(sources, output_dir=str(tmp_path / "spark-out"), manifest_dir=str(tmp_path / "spark-m"))
    expected = ingest(local)
    engine = Recording(spark)
    with pytest.MonkeyPatch.context() as patch:
        driver_reads_no_rows(patch)
        report = ingest(on_spark, engine)
    assert report == expected
    assert report["rows_by_source"] == {"m": 2 + 3 + 4 + 3, "again": 4}
    assert [line.split(":")[0] for line in report["file_errors"]] == [str(tmp_path / "in" / "1b.parquet")]
    # Six files: one task each to read, one each for the five readable ones to number.
    assert engine.maps == {"ingest: read files": [6], "ingest: number rows": [5]}
    got, want = parts(tmp_path / "spark-out"), parts(tmp_path / "out")
    assert sorted(got) == sorted(want) == ["000-00000.parquet", "000-00001.parquet", "000-00003.parquet",
                                           "000-00004.parquet", "001-00000.parquet"]
    for name in want:
        assert got[name].equals(want[name]), name
    csv = got["000-00004.parquet"]
    assert csv["uid"].to_list() == [9, 10, 11] and csv["reason"].to_list() == [None, "ingest:bad_row", None]
    assert not list((tmp_path / "spark-out" / "work" / "ingest" / "unnumbered").iterdir())

    # A part lost (as after a killed job): the rerun numbers that file again, the others stay.
    lost = tmp_path / "spark-out" / "work" / "ingest" / "000-00003.parquet"
    lost.unlink()
    kept = {p: p.stat().st_mtime_ns for p in lost.parent.glob("*.parquet")}
    again = Recording(spark)
    assert ingest(on_spark, again) == expected
    assert again.maps == {"ingest: read files": [6], "ingest: number rows": [5]}
    assert {p: p.stat().st_mtime_ns for p in kept} == kept
    assert pl.read_parquet(lost).equals(want["000-00003.parquet"])


def test_warc_files_are_scanned_by_the_executors_one_task_each(spark, make_recipe, tmp_path):
    from test_crawl import response, write_warc

    (tmp_path / "warc").mkdir()
    for f in range(2):
        write_warc(tmp_path / "warc" / f"{f}.warc.gz", lambda w, f=f: [
            response(w, f"http://s.example/{f}-{i}.html", f'<img src="{i}.jpg" alt="第{f}个文件第{i}页的图片说明">'.encode())
            for i in range(3)])
    sources = [{"name": "cc", "kind": "warc", "path": str(tmp_path / "warc" / "*.warc.gz")}]
    local = make_recipe(sources)
    on_spark = make_recipe(sources, output_dir=str(tmp_path / "spark-out"), manifest_dir=str(tmp_path / "spark-m"))
    expected = ingest(local)
    engine = Recording(spark)
    report = ingest(on_spark, engine)
    assert report == expected and report["source_reports"]["cc"]["files"][1]["pairs"] == 3
    assert engine.maps["ingest cc: scan WARC files"] == [2]
    for name in ("cc-00000.parquet", "cc-00001.parquet"):
        got, want = (pl.read_parquet(root / "work" / "crawl" / name) for root in (tmp_path / "spark-out", tmp_path / "out"))
        assert got.equals(want) and got.height == 3, name
    again = Recording(spark)  # scanned files are kept: a rerun scans nothing
    assert ingest(on_spark, again) == expected and "ingest cc: scan WARC files" not in again.maps
