"""The Spark engine: the same interface as LocalEngine (engine.py), on a SparkSession.

What runs where:
- `map_parts`: one Spark task per part (`parallelize(parts, len(parts))`), the stage's function
  shipped to the executors by pyspark's cloudpickle; results come back to the driver in part
  order (they are counts and small summaries, never rows).
- `scan` / `sql`: Spark DataFrames over the Parquet parts (matched by column name, a column
  missing from a part null there, types unified as the local engine unifies them) and
  `spark.sql` over temporary views; the stages' SQL strings are written for both dialects.
- `write`: the executors write the table as Spark part files into a hidden folder beside the
  target; then one task per part file casts it to the declared types and checks it with the
  same writer as the local engine (LocalEngine.write), into a second hidden folder, which is
  renamed into place at the target: on Spark a table is a folder of parts (`part-NNNNN.parquet`,
  in Spark's partition order, so an ORDER BY holds across them) that polars and Spark both read
  as one table, written by as many tasks as Spark wrote parts. A manifest (samples/, rejected/)
  stays one file per name, as users and checksums read it: one task writes it from the parts
  (a stream: bounded memory, one core's time). That step is where types Spark
  has not (UInt64 pHashes, which Spark reads as DECIMAL(20,0)) come back. The driver never
  holds the rows (it lists the part files).
- `rows`: collect, for the small results stages ask for (counts, a funnel).
- `map_isolated`: as map_parts, each part's function in a process its task spawns: the
  download's lanes (img2dataset behind the in-process guard, one lane per task, all rows of a
  host in the same lanes) on the executors.
- `find_duplicates`: the dedup rules as DataFrame operations (ops/neardup_spark.py), so no
  step gathers every row in one process.

Every path the stages hand over must be readable and writable by every executor under the same
absolute path (tasks open the parts with polars and tarfile, not through Spark): on local[N] this
machine's disk; on a cluster one POSIX folder they all mount at the same path, with atomic rename
(NFS, a mounted HDFS); object-store FUSE mounts have no atomic rename (README, Spark).
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

from cnclip._common.console import stage_progress
from cnclip._common.errors import CnclipError
from cnclip.corpus.runtime.engine import LocalEngine, Part, Result, Table

if TYPE_CHECKING:
    import polars as pl

    from cnclip.corpus.manifests.schemas import Table as FileSchema
    from cnclip.corpus.recipe import DedupSettings, EngineSettings


class SparkMissingError(CnclipError, RuntimeError):
    """engine.kind is spark but pyspark cannot be imported."""


def import_pyspark() -> Any:
    """pyspark.sql, or one line saying how to install it."""
    try:
        from pyspark import sql
    except ImportError:
        raise SparkMissingError("engine.kind is spark but pyspark is not installed: "
                                "pip install 'cnclip[spark]'") from None
    return sql


def session_from_settings(settings: EngineSettings, app_name: str = "cnclip") -> Any:
    """A SparkSession for the recipe's engine block (or the one already running in this process:
    Spark allows one per driver, and its master stays). Its Python workers run this interpreter
    unless told otherwise, so the executors import the cnclip and polars of the driver (on a
    cluster that path must hold the same environment on every node, or `conf` names another with
    spark.pyspark.python)."""
    sql = import_pyspark()
    # pyspark's SparkContext starts its workers with PYSPARK_PYTHON (spark.pyspark.python is read
    # only by spark-submit): the recipe's conf first, then what the environment says, then this
    # interpreter.
    python = settings.conf.get("spark.pyspark.python") or os.environ.get("PYSPARK_PYTHON") or sys.executable
    os.environ["PYSPARK_PYTHON"] = python
    builder = sql.SparkSession.builder.master(settings.master or "local[*]").appName(app_name)
    builder = builder.config("spark.pyspark.python", python)
    for key, value in settings.conf.items():
        builder = builder.config(key, value)
    return builder.getOrCreate()


def spark_type(dtype: pl.DataType) -> Any:
    """The Spark type a column of this polars type is read as from Parquet (unsigned types widen:
    UInt32 to BIGINT, UInt64 to DECIMAL(20,0), as Spark's Parquet reader does)."""
    import polars as pl
    from pyspark.sql import types as T

    simple = {pl.Int64: T.LongType(), pl.Int32: T.IntegerType(), pl.Int16: T.ShortType(), pl.Int8: T.ByteType(),
              pl.UInt32: T.LongType(), pl.UInt16: T.IntegerType(), pl.UInt8: T.ShortType(),
              pl.UInt64: T.DecimalType(20, 0), pl.String: T.StringType(), pl.Float64: T.DoubleType(),
              pl.Float32: T.FloatType(), pl.Boolean: T.BooleanType(), pl.Binary: T.BinaryType(),
              pl.Date: T.DateType(), pl.Null: T.StringType()}
    for polars_type, spark in simple.items():
        if dtype == polars_type:
            return spark
    raise TypeError(f"no Spark type for the polars type {dtype}")


def spark_path(path: Path | str) -> str:
    """A local path as Spark must be told it: absolute and file://, since Spark resolves a bare
    path against the cluster's default filesystem (HDFS on YARN) and a relative one against its
    own working folder; a URL (hdfs://, s3a://) is passed as it is."""
    text = str(path)
    if "://" in text:
        return text
    return "file://" + str(Path(text).absolute())


@dataclass(frozen=True)
class _Commit:
    """One of Spark's part files of a table -> the same rows as a part of the table's folder."""

    source: Path
    target: Path
    schema: Any
    table: Path  # the table's own path, which an error names


def commit_part(task: _Commit) -> int:
    """Runs as a Spark task: one part file through the local engine's writer (declared types,
    checked, renamed into place whole); returns its rows."""
    import polars as pl

    from cnclip.corpus.manifests.schemas import SchemaError

    try:
        LocalEngine(1).write(pl.scan_parquet(task.source), task.target, task.schema)
    except SchemaError as err:  # the table is what the stage wrote, not a hidden part of it
        raise SchemaError(str(err).replace(str(task.target), str(task.table), 1)) from None
    return pl.scan_parquet(task.target).select(pl.len()).collect().item()


def commit_whole(task: _Commit) -> int:
    """Runs as a Spark task: every part file of `task.source` (a folder), in partition order,
    through the local engine's writer as the one file `task.target`; returns the rows."""
    import polars as pl

    LocalEngine(1).write(pl.scan_parquet(sorted(task.source.glob("part-*.parquet"))), task.target, task.schema)
    return pl.scan_parquet(task.target).select(pl.len()).collect().item()


def writes_one_file(schema: Any) -> bool:
    """A manifest (samples/, rejected/: what users read, checksums cover and publishing copies)
    is one file per name; every other table is written as a folder of parts."""
    return getattr(schema, "root", None) == "manifest_dir"


def table_parts(path: Path | str) -> list[Path | str]:
    """The files of a table: itself, or the parts of a folder a Spark write made."""
    local = Path(path)
    if "://" not in str(path) and local.is_dir():
        return sorted(local.glob("part-*.parquet"))
    return [path]


def _replace(staging: Path, path: Path) -> None:
    """The folder `staging` at `path`, whatever was there moved aside first (a file a local build
    wrote, or an earlier folder) and removed after: a reader sees the old table, then the new,
    or, if the process dies between the two renames, none (the stage redoes it)."""
    old = path.with_name(f".{path.name}.old-{uuid.uuid4().hex[:8]}")
    if path.exists():
        path.rename(old)
    staging.rename(path)
    if old.is_dir():
        shutil.rmtree(old, ignore_errors=True)
    else:
        old.unlink(missing_ok=True)


def _watched(fn: Callable[[Part], Result], parent: int, part: Part) -> Result:
    """fn in a process that exits when its parent (the Spark task's worker) is gone, so a killed
    job leaves nothing running that a rerun would race with."""
    import threading
    import time

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()
    return fn(part)


@dataclass(frozen=True)
class _FreshProcess:
    """A task's function run in a freshly spawned process of its own ('spawn': nothing of the
    reused Spark worker, its imports or installed openers, carries over)."""

    fn: Callable[[Any], Any]

    def __call__(self, part: Any) -> Any:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            return pool.submit(_watched, self.fn, os.getpid(), part).result()


class SparkEngine:
    """A SparkSession: executors run the per-part maps, Spark SQL the global steps."""

    kind = "spark"

    def __init__(self, spark: Any):
        self.spark = spark
        self._views = 0

    @property
    def processes(self) -> int:
        """The cores Spark spreads a stage over (informational: every part is its own task)."""
        return self.spark.sparkContext.defaultParallelism

    def map_parts(self, fn: Callable[[Part], Result], parts: Sequence[Part], description: str,
                  processes: int | None = None) -> list[Result]:
        """One task per part; results in the order of `parts`. `processes` (a stage's own worker
        count) does not apply: the cluster's executors share the tasks."""
        if not parts:
            return []
        with stage_progress(description, total=len(parts)) as advance:
            context = self.spark.sparkContext
            context.setJobDescription(description)
            try:
                results = _task_errors(context.parallelize(list(parts), len(parts)).map(fn).collect)
            finally:
                context.setJobDescription(None)
            advance(len(results))
        return results

    def map_isolated(self, fn: Callable[[Part], Result], parts: Sequence[Part], description: str) -> list[Result]:
        """One task per part, each running fn in a process it spawns (see engine.IsolatedMaps)."""
        return self.map_parts(_FreshProcess(fn), parts, description)

    def scan(self, paths: Sequence[Path | str], schema: Mapping[str, Any] | None = None) -> Table:
        if not paths:
            from pyspark.sql import types as T

            fields = [T.StructField(name, spark_type(dtype), True) for name, dtype in (schema or {}).items()]
            return self.spark.createDataFrame([], T.StructType(fields))
        return self._read_unified(paths)

    def _read_unified(self, paths: Sequence[Path | str]) -> Table:
        """The parts matched by column name, each column of the type polars unifies the parts'
        types to (as LocalEngine's diagonal_relaxed concat does: Int32 and Int64 -> Int64, Float32
        and Float64 -> Float64, a number and a text -> text), null where a part lacks it. Spark's
        own mergeSchema refuses any two types that differ, so parts are read in groups of one
        schema (from their footers) and cast before the union; one group is one plain read."""
        import polars as pl
        from pyspark.sql import functions as F

        groups: dict[tuple, list[Path | str]] = {}
        for path in paths:  # a folder of parts (a table this engine wrote): one schema, its first part's
            groups.setdefault(tuple(pl.read_parquet_schema(table_parts(path)[0]).items()), []).append(path)
        if len(groups) == 1:
            return self.spark.read.parquet(*(spark_path(p) for p in paths))
        unified = pl.concat([pl.LazyFrame(schema=dict(group)) for group in groups],
                            how="diagonal_relaxed").collect_schema()
        frames = []
        for group, members in groups.items():
            present = dict(group)
            frame = self.spark.read.parquet(*(spark_path(p) for p in members))
            frames.append(frame.select(*(
                (F.col(name) if name in present and present[name] == dtype else
                 F.col(name).cast(spark_type(dtype)) if name in present else
                 F.lit(None).cast(spark_type(dtype))).alias(name)
                for name, dtype in unified.items())))
        table = frames[0]
        for frame in frames[1:]:
            table = table.unionByName(frame)
        return table

    def sql(self, query: str, **tables: Table) -> Table:
        """Each table a temporary view under its keyword's name for the analysis of this query
        (the result keeps the plans it read, so later views of the same name do not change it)."""
        for name, table in tables.items():
            table.createOrReplaceTempView(name)
        try:
            return self.spark.sql(query)
        finally:
            for name in tables:
                self.spark.catalog.dropTempView(name)

    def write(self, table: Table, path: Path, schema: Mapping[str, Any] | FileSchema | None = None) -> None:
        """The executors write part files beside `path`; one task per part casts and checks it into
        a folder renamed into place at `path`, or, for a manifest, one task makes them its one file
        (see the module's docstring); the hidden folders are removed whatever happens."""
        path = Path(path).absolute()  # the committing tasks' workers need not share this folder
        token = uuid.uuid4().hex[:8]
        written = path.with_name(f".{path.name}.spark-{token}")
        staging = path.with_name(f".{path.name}.parts-{token}")
        try:
            table.write.mode("overwrite").parquet(spark_path(written))
            parts = sorted(written.glob("part-*.parquet"))
            if not parts:
                raise RuntimeError(f"{written}: Spark wrote no part file")
            if writes_one_file(schema):
                self.map_parts(commit_whole, [_Commit(written, path, schema, path)], f"write {path.name}")
                return
            staging.mkdir(parents=True)
            tasks = [_Commit(part, staging / f"part-{index:05d}.parquet", schema, path)
                     for index, part in enumerate(parts)]
            self.map_parts(commit_part, tasks, f"write {path.name}")
            _replace(staging, path)
        finally:
            shutil.rmtree(written, ignore_errors=True)
            shutil.rmtree(staging, ignore_errors=True)

    def rows(self, table: Table) -> list[tuple]:
        return [tuple(row) for row in table.collect()]

    def find_duplicates(self, rows: Table, settings: DedupSettings, eval_hashes: pl.DataFrame | None) -> Table:
        """The dedup rules of ops/dedup.py as Spark operations (ops/neardup_spark.py)."""
        from cnclip.corpus.ops.neardup_spark import find_duplicates

        return find_duplicates(self.spark, rows, settings, eval_hashes)


# The last line of a Python traceback: the exception's (module-qualified) class and message.
_RAISED = re.compile(r"^([A-Za-z_][\w.]*): (.+)$", re.MULTILINE)


def _python_error(err: Exception) -> Exception | None:
    """An error a task raised reaches the driver as a py4j/pyspark error whose message holds the
    worker's traceback. A user's error (CnclipError: one line), a disk's (OSError) or the build's
    own SchemaError is raised again as itself, with its own line, as the local engine would."""
    import importlib

    from cnclip.corpus.manifests.schemas import SchemaError

    if type(err).__module__.split(".")[0] not in ("py4j", "pyspark"):
        return None
    for name, message in reversed(_RAISED.findall(str(err))):
        module, _, attribute = name.rpartition(".")
        try:
            raised = getattr(importlib.import_module(module or "builtins"), attribute)
        except (ImportError, AttributeError, ValueError):
            continue
        if not (isinstance(raised, type) and issubclass(raised, BaseException)):
            continue
        if not issubclass(raised, (CnclipError, OSError, SchemaError)):
            return None  # the task's last error is a bug: Spark's error keeps its traceback
        try:
            return raised(message.strip())
        except Exception:  # a class that needs other arguments: keep Spark's error
            return None
    return None


def _task_errors(run: Callable[[], Result]) -> Result:
    try:
        return run()
    except Exception as err:
        converted = _python_error(err)
        if converted is not None:
            raise converted from None
        raise


def make_spark_engine(settings: EngineSettings) -> SparkEngine:
    return SparkEngine(session_from_settings(settings))
