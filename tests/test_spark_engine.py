"""The Spark engine's interface, one call at a time: parts as tasks in order, scans that fill a
missing column with nulls, SQL whose views cannot leak into an earlier result, writes through the
declared schema (Spark's DECIMAL pHashes back to UInt64), a refused write that leaves nothing, and
the recipe block and API that select it."""

import os
import sys
from pathlib import Path

import polars as pl
import pytest

from cnclip.corpus.manifests.schemas import HASHES, TEXT_REPEATED_CAPTIONS, SchemaError
from cnclip.corpus.recipe import RecipeError, parse_recipe
from cnclip.corpus.runtime.engine import FindsDuplicates, LocalEngine, make_engine
from spark_session import spark  # noqa: F401 (the session fixture)

RECIPE = {"name": "x", "output_dir": "out", "manifest_dir": "manifests",
          "sources": [{"name": "s", "kind": "sample_web"}]}


def engine_block(**engine):
    return parse_recipe({**RECIPE, "engine": engine}, "r.yaml", check_paths=False).engine


@pytest.mark.spark
def test_parts_run_as_tasks_in_other_processes_and_come_back_in_order(spark):
    from cnclip.corpus.runtime.spark_engine import SparkEngine

    engine = SparkEngine(spark)
    parts = [f"part-{i}" for i in (5, 3, 9, 0, 1)]
    # A lambda: shipped by value (cloudpickle), as a test module is not importable on the workers.
    results = engine.map_parts(lambda part: (part, os.getpid()), parts, "test")
    assert [part for part, _ in results] == parts
    assert os.getpid() not in {pid for _, pid in results}
    assert engine.map_parts(lambda part: 1 / 0, [], "test") == []


@pytest.mark.spark
def test_a_user_error_in_a_task_is_its_own_one_line_on_the_driver(spark):
    """As on the local engine: the error class and its line, not Spark's Java traceback."""
    from cnclip.corpus.runtime.spark_engine import SparkEngine

    def refuse(part):  # nested: shipped by value, as this module is not on the workers' path
        from cnclip.corpus.recipe import RecipeError

        if part == "bad":
            raise RecipeError(f"r.yaml: text.blacklist: cannot read {part!r} (No such file or directory)")
        return part

    with pytest.raises(RecipeError) as raised:
        SparkEngine(spark).map_parts(refuse, ["good", "bad"], "test")
    assert str(raised.value) == "r.yaml: text.blacklist: cannot read 'bad' (No such file or directory)"


@pytest.mark.spark
def test_scan_fills_missing_columns_and_sql_keeps_what_it_read(spark, tmp_path):
    from cnclip.corpus.runtime.spark_engine import SparkEngine

    engine = SparkEngine(spark)
    pl.DataFrame({"uid": [1, 2], "extra": ["a", "b"]}).write_parquet(tmp_path / "a.parquet")
    pl.DataFrame({"uid": [3]}).write_parquet(tmp_path / "b.parquet")
    both = engine.scan([tmp_path / "a.parquet", tmp_path / "b.parquet"])
    assert sorted(engine.rows(engine.sql("SELECT uid, extra FROM t", t=both))) == [(1, "a"), (2, "b"), (3, None)]
    first = engine.sql("SELECT uid FROM t", t=engine.scan([tmp_path / "b.parquet"]))
    engine.sql("SELECT uid FROM t", t=both)  # a later query's table of the same name
    assert engine.rows(first) == [(3,)]
    empty = engine.scan([], {"uid": pl.Int64, "phash": pl.UInt64, "caption": pl.String})
    assert engine.rows(engine.sql("SELECT COUNT(*) FROM e", e=empty)) == [(0,)]
    assert [f.name for f in empty.schema.fields] == ["uid", "phash", "caption"]


@pytest.mark.spark
def test_parts_of_differing_types_unify_as_on_the_local_engine(spark, tmp_path):
    """Keep columns of two sources, or CSV files typed one by one, differ in type from part to part:
    Spark's mergeSchema would refuse them; the scan gives the local engine's unified columns."""
    from cnclip.corpus.runtime.spark_engine import SparkEngine

    parts = [tmp_path / f"{i}.parquet" for i in range(4)]
    pl.DataFrame({"uid": [1], "score": pl.Series([0.5], dtype=pl.Float32), "n": pl.Series([1], dtype=pl.Int32),
                  "tag": [7]}).write_parquet(parts[0])
    pl.DataFrame({"uid": [2], "score": [0.25], "n": [2], "tag": ["seven"]}).write_parquet(parts[1])
    pl.DataFrame({"uid": [3]}).write_parquet(parts[2])
    pl.DataFrame({"uid": [4], "score": [0.75], "n": [4], "tag": ["x"]}).write_parquet(parts[3])
    spark_engine, local = SparkEngine(spark), LocalEngine(1)
    query = "SELECT uid, score, n, tag FROM t ORDER BY uid"
    got = spark_engine.rows(spark_engine.sql(query, t=spark_engine.scan(parts)))
    assert got == local.rows(local.sql(query, t=local.scan(parts)))
    assert got[0] == (1, 0.5, 1, "7") and got[2] == (3, None, None, None)


@pytest.mark.spark
def test_relative_paths_are_this_process_folder_not_the_jvm_one(spark, tmp_path, monkeypatch):
    from cnclip.corpus.runtime.spark_engine import SparkEngine

    engine = SparkEngine(spark)
    monkeypatch.chdir(tmp_path)  # the JVM keeps the folder it started in
    pl.DataFrame({"uid": [4, 5]}).write_parquet("rel.parquet")
    engine.write(engine.sql("SELECT uid FROM t", t=engine.scan([Path("rel.parquet")])), Path("out/copy.parquet"),
                 {"uid": pl.Int64})
    assert pl.read_parquet(tmp_path / "out" / "copy.parquet")["uid"].sort().to_list() == [4, 5]


@pytest.mark.spark
def test_write_casts_to_the_declared_types_and_refuses_what_does_not_fit(spark, tmp_path):
    from cnclip.corpus.runtime.spark_engine import SparkEngine

    engine = SparkEngine(spark)
    top = 2**64 - 1
    pl.DataFrame({"uid": [2, 1], "phash": [top, 7]}, schema={"uid": pl.Int64, "phash": pl.UInt64}).write_parquet(
        tmp_path / "h.parquet")
    hashes = engine.sql("SELECT * FROM h ORDER BY uid", h=engine.scan([tmp_path / "h.parquet"]))
    engine.write(hashes, tmp_path / "out" / "hashes.parquet", HASHES)
    written = pl.read_parquet(tmp_path / "out" / "hashes.parquet")
    assert written.schema == HASHES.columns and written.rows() == [(1, 7), (2, top)]
    counts = engine.sql("SELECT 'x' AS caption, COUNT(*) AS caption_count FROM h", h=hashes)  # BIGINT in Spark
    engine.write(counts, tmp_path / "out" / "counts.parquet", TEXT_REPEATED_CAPTIONS)
    assert pl.read_parquet(tmp_path / "out" / "counts.parquet").schema == TEXT_REPEATED_CAPTIONS.columns
    # A column the declared table does not have is the stage's bug: refused, nothing left behind.
    leaking = engine.sql("SELECT uid, phash, 'x' AS stray FROM h", h=engine.scan([tmp_path / "h.parquet"]))
    target = tmp_path / "out" / "leak.parquet"
    with pytest.raises(SchemaError, match=r"^.*leak\.parquet: column 'stray' is not declared \(table work/hash"):
        engine.write(leaking, target, HASHES)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["counts.parquet", "hashes.parquet"]


@pytest.mark.spark
def test_the_engine_block_reaches_the_session_and_spark_finds_duplicates_itself(spark, monkeypatch):
    from cnclip.corpus.runtime.spark_engine import SparkEngine

    before = spark.conf.get("spark.sql.shuffle.partitions")
    # The workers' interpreter: this one unless the environment or the recipe names another.
    monkeypatch.delenv("PYSPARK_PYTHON")
    make_engine(engine_block(kind="spark", master="local[2]"))
    assert os.environ["PYSPARK_PYTHON"] == sys.executable
    make_engine(engine_block(kind="spark", conf={"spark.pyspark.python": "/opt/env/bin/python"}))
    assert os.environ["PYSPARK_PYTHON"] == "/opt/env/bin/python"
    monkeypatch.setenv("PYSPARK_PYTHON", sys.executable)
    try:
        engine = make_engine(engine_block(kind="spark", master="local[2]",
                                          conf={"spark.sql.shuffle.partitions": 3}))
        assert isinstance(engine, SparkEngine) and engine.spark.conf.get("spark.sql.shuffle.partitions") == "3"
    finally:
        spark.conf.set("spark.sql.shuffle.partitions", before)
    assert isinstance(engine, FindsDuplicates) and not isinstance(LocalEngine(1), FindsDuplicates)


def test_spark_without_pyspark_is_one_line(monkeypatch):
    from cnclip._common.errors import CnclipError

    monkeypatch.setitem(sys.modules, "pyspark", None)  # import pyspark now fails
    with pytest.raises(CnclipError) as raised:
        make_engine(engine_block(kind="spark"))
    assert str(raised.value) == "engine.kind is spark but pyspark is not installed: pip install 'cnclip[spark]'"


def test_a_spark_recipe_without_pyspark_stops_the_cli_with_one_line_writing_nothing(monkeypatch, tmp_path):
    import yaml
    from typer.testing import CliRunner

    from cnclip.cli import app

    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({**RECIPE, "output_dir": str(tmp_path / "out"),
                                      "manifest_dir": str(tmp_path / "manifests"),
                                      "engine": {"kind": "spark", "master": "local[2]"}}))
    monkeypatch.setitem(sys.modules, "pyspark", None)
    result = CliRunner().invoke(app, ["corpus", "build", str(recipe)])
    assert result.exit_code == 2, result.output
    assert [line for line in result.output.splitlines() if line.strip()] == [
        "error: engine.kind is spark but pyspark is not installed: pip install 'cnclip[spark]'"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml"]


@pytest.mark.parametrize("master", ["local", "local[2]", "local[*]", "spark://head-node:7077", "yarn",
                                    "k8s://https://127.0.0.1:6443"])
def test_spark_masters_a_session_can_be_built_for(master):
    assert engine_block(kind="spark", master=master).master == master


@pytest.mark.parametrize(("engine", "message"), [
    ({"kind": "spark", "master": "local[0]"}, "r.yaml: engine.master: Value error, expected local[N], local[*], "
     "spark://host:port, yarn or k8s://<api server> (got 'local[0]')"),
    ({"kind": "spark", "master": "spark://head-node"}, "r.yaml: engine.master: Value error, expected local[N], "
     "local[*], spark://host:port, yarn or k8s://<api server> (got 'spark://head-node')"),
    ({"kind": "spark", "conf": {"spark.jars": ["a.jar"]}},
     "r.yaml: engine.conf.spark.jars: Value error, expected a text, number or true/false (got ['a.jar'])"),
    ({"kind": "spark", "mastr": "yarn"}, "r.yaml: engine.mastr: unknown key"),
    ({"kind": "flink"}, "r.yaml: engine.kind: Input should be 'local' or 'spark' (got 'flink')"),
])
def test_bad_engine_blocks_name_the_key(engine, message):
    with pytest.raises(RecipeError) as raised:
        engine_block(**engine)
    assert str(raised.value) == message


def test_spark_settings_on_the_local_engine_are_refused():
    with pytest.raises(RecipeError, match=r"^r\.yaml: engine: Value error, master is a setting of kind: spark "
                                          r"\(kind is local\)"):
        engine_block(master="yarn")
    with pytest.raises(RecipeError, match=r"^r\.yaml: engine: Value error, conf is a setting of kind: spark"):
        engine_block(kind="local", conf={"spark.ui.enabled": False})
    # A dumped recipe spells every key out, empty ones too: it loads again.
    assert engine_block(**engine_block(processes=3).model_dump(mode="json")).processes == 3
    assert engine_block(kind="spark", conf={"spark.ui.enabled": False}).conf == {"spark.ui.enabled": "false"}


def test_build_takes_an_engine_or_a_session_not_both(make_recipe):
    from cnclip.corpus import build

    recipe = make_recipe([{"name": "s", "kind": "sample_web"}])
    with pytest.raises(ValueError, match="pass engine= or spark=, not both"):
        build(recipe, engine=LocalEngine(1), spark=object())
    assert not (recipe.output_dir / "work").exists()


@pytest.mark.spark
def test_a_table_is_written_by_a_task_per_part_as_a_folder_that_every_reader_reads(spark, tmp_path):
    """No one task rewrites a whole table: each of Spark's parts is cast and checked by its own
    task into the table's folder, renamed into place over what was there (an earlier build's
    file); polars, the local engine and Spark read the folder as the table, in order."""
    from cnclip.corpus.runtime.commit import is_committed
    from cnclip.corpus.runtime.spark_engine import SparkEngine

    maps = []

    class Noting(SparkEngine):
        def map_parts(self, fn, parts, description, processes=None):
            maps.append((description, [part.target.name for part in parts]))
            return super().map_parts(fn, parts, description, processes)

    engine = Noting(spark)
    top = 2**64 - 1
    pl.DataFrame({"uid": range(900), "phash": [top - i for i in range(900)]},
                 schema={"uid": pl.Int64, "phash": pl.UInt64}).write_parquet(tmp_path / "h.parquet")
    out = tmp_path / "out"
    out.mkdir()
    target = out / "hashes.parquet"
    pl.DataFrame({"uid": [-1], "phash": [0]}, schema=HASHES.columns).write_parquet(target)
    table = engine.scan([tmp_path / "h.parquet"]).repartitionByRange(3, "uid").sortWithinPartitions("uid")
    engine.write(table, target, HASHES)
    parts = ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    assert maps == [("write hashes.parquet", parts)]
    assert is_committed(target) and sorted(p.name for p in target.iterdir()) == parts
    assert [p.name for p in out.iterdir()] == ["hashes.parquet"]  # nothing hidden left beside it
    assert all(pl.read_parquet(target / part).height > 0 for part in parts)
    written = pl.read_parquet(target)
    assert written.schema == HASHES.columns and written["uid"].to_list() == list(range(900))
    assert written["phash"].max() == top
    assert LocalEngine(1).scan([target]).collect().equals(written)
    assert engine.rows(engine.sql("SELECT COUNT(*), MIN(uid) FROM t", t=engine.scan([target]))) == [(900, 0)]
    # Written again (a rerun), smaller: the folder is replaced whole.
    engine.write(engine.sql("SELECT * FROM t WHERE uid < 5", t=engine.scan([target])), target, HASHES)
    assert pl.read_parquet(target)["uid"].sort().to_list() == [0, 1, 2, 3, 4]
