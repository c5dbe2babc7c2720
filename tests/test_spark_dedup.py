"""The dedup rules on Spark DataFrames (ops/neardup_spark.py) against the array form the local
engine runs (ops/dedup.py): the same decisions, row for row, on hashes built to hurt (chains of
3-bit steps, 150 copies of one hash, a long run of one band key, planted flips, hashes with the
top bit set), exact copies, unhashable rows, evaluation images and caption duplicates."""

import numpy as np
import polars as pl
import pytest
from polars.testing import assert_frame_equal

from cnclip.corpus.manifests.schemas import DEDUP_DECISIONS
from cnclip.corpus.ops.dedup import find_duplicates
from cnclip.corpus.recipe import DedupSettings
from cnclip.corpus.runtime.spark_engine import SparkEngine
from conftest import flip
from spark_session import spark  # noqa: F401 (the session fixture)
from test_dedup_bands import hostile_hashes

pytestmark = pytest.mark.spark


def planted_rows(seed):
    """uid, sha256, phash, caption: hostile hashes, near copies at known distances, byte copies,
    rows without a hash, and pairs of one caption whose images are 8-10 bits apart."""
    rng = np.random.default_rng(seed)
    hashes = hostile_hashes(seed)[:600].copy()
    count = len(hashes)
    sha = [f"sha{i}" for i in range(count)]
    captions = [f"标题{i}" for i in range(count)]
    for i in range(0, 40):  # near copies of rows 100..139, 1..5 bits away
        hashes[200 + i] = flip(hashes[100 + i], rng.choice(64, 1 + i % 5, replace=False))
    for i in range(0, 10):  # byte copies (sha256 equal), their hashes equal too
        sha[300 + i], hashes[300 + i] = sha[150 + i], hashes[150 + i]
    for i in range(0, 10):  # same caption, 8-10 bits apart: only the text rule links them
        hashes[400 + i] = flip(hashes[160 + i], range(20, 28 + i % 3))
        captions[400 + i] = captions[160 + i]
    phash = pl.Series(hashes, dtype=pl.UInt64).scatter([500, 501, 502], None)
    uids = rng.permutation(np.arange(count, dtype=np.int64) * 7 + (1 << 40))
    assert (hashes >= np.uint64(1 << 63)).any()
    return pl.DataFrame({"uid": uids, "sha256": sha, "phash": phash, "caption": captions},
                        schema={"uid": pl.Int64, "sha256": pl.String, "phash": pl.UInt64, "caption": pl.String})


def spark_decisions(spark, tmp_path, rows, settings, evals):
    engine = SparkEngine(spark)
    rows.write_parquet(tmp_path / "rows.parquet")  # read back by Spark: pHashes as DECIMAL(20,0)
    found = engine.find_duplicates(engine.scan([tmp_path / "rows.parquet"]), settings, evals)
    engine.write(found, tmp_path / "decisions.parquet", DEDUP_DECISIONS)
    return pl.read_parquet(tmp_path / "decisions.parquet")


@pytest.mark.parametrize(("seed", "settings"), [
    (0, DedupSettings(phash_max_distance=4, text=True, text_max_distance=10)),
    (1, DedupSettings(phash_max_distance=0, exact=False)),
])
def test_spark_dedup_equals_the_array_form(spark, tmp_path, seed, settings):
    rows = planted_rows(seed)
    evals = pl.DataFrame({"id": ["e-far", "e-near", "e-same"],
                          "phash": [flip(rows["phash"][10], range(30)), flip(rows["phash"][20], [0, 63]),
                                    rows["phash"][20]]}, schema={"id": pl.String, "phash": pl.UInt64})
    expected = find_duplicates(rows.lazy(), settings, evals)
    reasons = set(expected["reason"])
    assert {"dedup:near_duplicate", "dedup:eval_overlap"} <= reasons
    if settings.exact:
        assert {"dedup:exact_duplicate", "dedup:text_duplicate"} <= reasons
    assert_frame_equal(spark_decisions(spark, tmp_path, rows, settings, evals), expected)


def test_rows_without_any_hash_leave_only_byte_copies(spark, tmp_path):
    rows = planted_rows(4).with_columns(pl.lit(None, pl.UInt64).alias("phash"))
    evals = pl.DataFrame({"id": ["e"], "phash": [5]}, schema={"id": pl.String, "phash": pl.UInt64})
    settings = DedupSettings(text=True)
    expected = find_duplicates(rows.lazy(), settings, evals)
    assert set(expected["reason"]) == {"dedup:exact_duplicate"}
    assert_frame_equal(spark_decisions(spark, tmp_path, rows, settings, evals), expected)


def test_every_rule_off_decides_nothing(spark, tmp_path):
    found = spark_decisions(spark, tmp_path, planted_rows(2), DedupSettings(exact=False, near=False), None)
    assert found.height == 0 and found.schema == DEDUP_DECISIONS.columns


def test_with_a_checkpoint_folder_the_rounds_are_checkpointed_there_alike(spark, tmp_path):
    """Where the session has spark.checkpoint.dir (clusters with dynamic allocation), the label
    propagation's rounds are written there instead of kept on executors, with the same result.
    (The folder stays set for the rest of the session: Spark has no way to unset it.)"""
    rows = planted_rows(3)
    settings = DedupSettings(phash_max_distance=4)
    spark.sparkContext.setCheckpointDir(str(tmp_path / "checkpoints"))
    found = spark_decisions(spark, tmp_path, rows, settings, None)
    assert_frame_equal(found, find_duplicates(rows.lazy(), settings, None))
    assert any((tmp_path / "checkpoints").rglob("part-*"))


def test_the_driver_of_a_spark_build_never_imports_numba():
    """numba (~60 MiB and most of a second to import) serves only the array form; the Spark rules
    plan their bands with neardup.band_plan on the driver, which needs none of it."""
    import subprocess
    import sys

    probe = ("import sys\n"
             "import cnclip.corpus.pipeline, cnclip.corpus.stages.dedup, cnclip.corpus.runtime.spark_engine\n"
             "from cnclip.corpus.ops import neardup_spark\n"
             "from cnclip.corpus.ops.neardup import band_plan\n"
             "assert band_plan(10**8, 4, 10**6).bands\n"
             "print('numba' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False"]
