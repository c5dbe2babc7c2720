"""The engine a build runs on: a per-part map, and the global relational steps as SQL.

Stage code sees only this interface, built once per build from the recipe's `engine:` block
(`make_engine`) and handed to every stage in its context:

- `map_parts(fn, parts, description)`: a picklable function over a list of part descriptions
  (one input part -> one output part); the stage does not know whether the parts run inline,
  in a local process pool, or on a cluster.
- `scan(paths)`, `sql(query, **tables)`, `write(table, path, schema)`, `rows(table)`: the
  global steps (pair collapse, the caption cap, the shard plan, rejects, the funnel) are SQL
  strings over tables scanned from Parquet parts. The strings keep to what polars' SQLContext
  and Spark SQL both read (joins incl. `LEFT ANTI JOIN`, `GROUP BY`, `ROW_NUMBER() OVER`,
  `LPAD`, `CAST`, `COALESCE`), so a Spark engine runs the same strings with `spark.sql`.
  A table is the backend's own lazy handle: stage code only passes it back to the engine.

LocalEngine runs both on this machine: a process pool and polars' lazy engine, whose plans
stream from the parts, so the driver never holds all rows of a step. The Spark engine
(spark_engine.py, `engine: {kind: spark}`) runs the same interface on a SparkSession.
"""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Protocol, Sequence, TypeVar, runtime_checkable

from cnclip._common.console import stage_progress
from cnclip._common.mainguard import require_main_guard

if TYPE_CHECKING:
    from cnclip.corpus.manifests.schemas import Table as FileSchema
    from cnclip.corpus.recipe import EngineSettings

Part = TypeVar("Part")
Result = TypeVar("Result")
Table = Any  # the backend's lazy table (a polars LazyFrame here, a Spark DataFrame there)


class Engine(Protocol):
    """What stages may ask of an engine; nothing else about the backend leaks into them."""

    kind: str
    processes: int

    def map_parts(self, fn: Callable[[Part], Result], parts: Sequence[Part], description: str,
                  processes: int | None = None) -> list[Result]:
        """fn over every part, results in the order of `parts`; `processes` overrides the engine's."""

    def scan(self, paths: Sequence[Path | str], schema: Mapping[str, Any] | None = None) -> Table:
        """The rows of these Parquet parts, matched by column name (a column missing from a part is
        null there); no parts: an empty table of `schema` (column -> polars type)."""

    def sql(self, query: str, **tables: Table) -> Table:
        """The query over the tables, each registered under its keyword's name."""

    def write(self, table: Table, path: Path, schema: Mapping[str, Any] | FileSchema | None = None) -> None:
        """The table as one Parquet file, whole or not at all. `schema`: exactly those columns, in
        that order and of those types (null where the table lacks one); or a declared table of
        manifests/schemas.py: its columns cast so, any others (keep columns) after them, and the
        result checked against the table (SchemaError before anything is written)."""

    def rows(self, table: Table) -> list[tuple]:
        """A small result (counts, a summary) on the driver, as tuples."""


@runtime_checkable
class FindsDuplicates(Protocol):
    """A capability: an engine whose tables may not meet in one process runs the dedup rules
    itself, as relational steps over its own tables (the Spark engine). An engine without it hands
    the dedup stage polars frames, which run the array form of ops/dedup.py (faster on one machine)."""

    def find_duplicates(self, rows: Table, settings: Any, eval_hashes: Any) -> Table:
        """rows (uid, sha256, phash, caption) -> one decision row per dropped row (DECISION_SCHEMA)."""


@runtime_checkable
class IsolatedMaps(Protocol):
    """A capability: an engine whose workers are not this build's own processes (Spark's reused
    Python workers) runs a map whose parts must each start clean (the download's lanes: OpenCV
    reads its pixel limit once per process, the guarded opener is process-wide) in a fresh
    process per part. Without it, the stage spawns its own workers."""

    def map_isolated(self, fn: Callable[[Part], Result], parts: Sequence[Part], description: str) -> list[Result]:
        """fn over every part, each in a process started for it; results in the order of `parts`."""


class LocalEngine:
    """This machine: a process pool ('spawn': polars and OpenCV are not fork-safe) and polars."""

    kind = "local"

    def __init__(self, processes: int = 1):
        self.processes = max(1, processes)

    def map_parts(
        self, fn: Callable[[Part], Result], parts: Sequence[Part], description: str, processes: int | None = None
    ) -> list[Result]:
        """fn over every part; results in the order of `parts`, with a progress bar."""
        workers = max(1, processes or self.processes)
        if workers > 1 and len(parts) > 1:  # before the pool: its workers would re-run an unguarded script
            require_main_guard(description)
        results: list[Result] = []
        with stage_progress(description, total=len(parts)) as advance:
            for result in self._run(fn, parts, workers):
                results.append(result)
                advance()
        return results

    def _run(self, fn: Callable[[Part], Result], parts: Sequence[Part], workers: int) -> Iterator[Result]:
        if workers == 1 or len(parts) <= 1:
            yield from map(fn, parts)
            return
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(min(workers, len(parts)), mp_context=context) as pool:
            yield from pool.map(fn, parts)

    def scan(self, paths: Sequence[Path | str], schema: Mapping[str, Any] | None = None) -> Table:
        import polars as pl

        from cnclip.corpus.runtime.storage import scan_parquet  # a local path or an fsspec URL

        if not paths:
            return pl.LazyFrame(schema=dict(schema or {}))
        return scan_parquet(paths)

    def sql(self, query: str, **tables: Table) -> Table:
        import polars as pl

        return pl.SQLContext(tables).execute(query, eager=False)

    def write(self, table: Table, path: Path, schema: Mapping[str, Any] | FileSchema | None = None) -> None:
        import polars as pl

        from cnclip.corpus.runtime.state import write_parquet_atomic

        extra: list[str] = []
        check = None
        names = table.collect_schema().names() if schema is not None else []
        if schema is not None and not isinstance(schema, Mapping):  # a declared table: keep columns follow
            check, schema = schema, schema.columns
            extra = [name for name in names if name not in schema]
        if schema is not None:
            present = set(names)
            table = table.select(
                *((pl.col(name) if name in present else pl.lit(None)).cast(dtype).alias(name)
                  for name, dtype in schema.items()),
                *extra,
            )
        if check is not None:
            check.write(table, path)
        else:
            write_parquet_atomic(table, path)

    def rows(self, table: Table) -> list[tuple]:
        return table.collect().rows()


def default_engine() -> Engine:
    """One local process: for a global step called on its own (a test, a notebook); a build hands
    every stage the engine of its recipe instead."""
    return LocalEngine(1)


def _spark(settings: "EngineSettings") -> Engine:
    from cnclip.corpus.runtime.spark_engine import make_spark_engine  # pyspark only when asked for

    return make_spark_engine(settings)


ENGINES: dict[str, Callable[["EngineSettings"], Engine]] = {
    "local": lambda settings: LocalEngine(settings.processes),
    "spark": _spark,
}


def make_engine(settings: "EngineSettings") -> Engine:
    """The engine a recipe's `engine:` block names (the recipe schema admits only known kinds)."""
    return ENGINES[settings.kind](settings)
