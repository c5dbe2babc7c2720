"""Test helpers: a Spark engine that notes what it was asked, and a driver that may read no rows.

Polars reads are refused in the test's own process (the driver) while a stage runs; the
executors' Python workers are other processes, so what runs as an engine task or query is not
affected. A step that read rows on the driver would fail the test."""

import polars as pl
import pytest

from cnclip.corpus.runtime.spark_engine import SparkEngine

# Every polars entry point that reads rows into this process.
READERS = ("read_parquet", "scan_parquet", "read_ipc", "scan_ipc", "read_csv", "scan_csv", "read_ndjson",
           "scan_ndjson", "read_json")


class Recording(SparkEngine):
    """The Spark engine, noting each map's description and part count, and the length of each
    result the driver got back."""

    def __init__(self, spark):
        super().__init__(spark)
        self.maps: dict[str, list[int]] = {}
        self.returned: list[int] = []

    def map_parts(self, fn, parts, description, processes=None):
        self.maps.setdefault(description, []).append(len(parts))
        return super().map_parts(fn, parts, description, processes)

    def rows(self, table):
        rows = super().rows(table)
        self.returned.append(len(rows))
        return rows


def driver_reads_no_rows(patch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("the driver read rows with polars")

    for name in READERS:
        patch.setattr(pl, name, refuse)
    patch.setattr(pl.LazyFrame, "collect", refuse)
