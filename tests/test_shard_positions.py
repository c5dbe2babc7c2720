"""The shard plan's numbering: kept rows numbered in uid order across uid buckets (ranges of 2^20
uids, each numbered on its own from the counts of the buckets before it), the same on the local
and the Spark engine."""

import polars as pl
import pytest

from cnclip.corpus.runtime.engine import LocalEngine
from cnclip.corpus.stages.shard import kept_positions
from spark_session import spark  # noqa: F401 (the session fixture)

BUCKET = 1 << 20
# Rows at bucket edges, in three buckets of one source and in a second source (uid 2^40 on).
UIDS = [3, BUCKET - 1, BUCKET, BUCKET + 1, 5 * BUCKET + 7, (1 << 40), (1 << 40) + 2, (1 << 40) + 3 * BUCKET]
FAILED, DROPPED = {BUCKET + 1}, {5 * BUCKET + 7, 3}


def tables(tmp_path):
    shuffled = UIDS[::-1]  # the parts' order is not uid order
    pl.DataFrame({"uid": shuffled}).write_parquet(tmp_path / "accepted.parquet")
    pl.DataFrame({"uid": shuffled, "status": ["error" if u in FAILED else "success" for u in shuffled]}).write_parquet(
        tmp_path / "attempts.parquet")
    pl.DataFrame({"uid": sorted(DROPPED)}).write_parquet(tmp_path / "dropped.parquet")
    return [tmp_path / f"{name}.parquet" for name in ("accepted", "attempts", "dropped")]


def positions(engine, tmp_path):
    accepted, attempts, dropped = (engine.scan([p]) for p in tables(tmp_path))
    found = kept_positions(engine, accepted, attempts, dropped)
    return sorted(engine.rows(engine.sql("SELECT uid, position FROM p", p=found)))


EXPECTED = [(uid, i) for i, uid in enumerate(u for u in UIDS if u not in FAILED | DROPPED)]


def test_positions_run_on_across_buckets_and_sources(tmp_path):
    assert positions(LocalEngine(1), tmp_path) == EXPECTED
    assert [p for _, p in EXPECTED] == list(range(5))


@pytest.mark.spark
def test_spark_numbers_the_same(spark, tmp_path):
    from cnclip.corpus.runtime.spark_engine import SparkEngine

    assert positions(SparkEngine(spark), tmp_path) == EXPECTED
