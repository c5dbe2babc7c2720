"""The text and dedup stages on ROWS synthetic rows (default 1M): the local engine against the Spark
engine on local[2], in the same run, on the same inputs. The ratio is Spark's fixed cost on one
machine (task scheduling, JVM <-> Python transfers, shuffles to local disk): what running on a
cluster costs before it gains anything. Both engines must give the same outputs (checked).

CNCLIP_BENCH_ROWS=100000 for a quick run.
"""

from __future__ import annotations

import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl

ROWS = int(os.environ.get("CNCLIP_BENCH_ROWS", 1_000_000))
PARTS = 8
WORDS = ["一隻貓", "在沙發上", "睡覺", "美丽的", "风景", "高清壁纸", "的照片", "北京", "上海", "夕陽下的", "海邊",
         "小狗", "公园里", "奔跑", "IMG_2023", "a photo of"]


def spark_session():
    from pyspark.sql import SparkSession

    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)  # the workers import this venv's cnclip
    builder = SparkSession.builder.master("local[2]").appName("cnclip-bench")
    for key, value in {"spark.driver.host": "127.0.0.1", "spark.driver.bindAddress": "127.0.0.1",
                       "spark.ui.enabled": "false", "spark.ui.showConsoleProgress": "false",
                       "spark.sql.shuffle.partitions": "8",
                       # local[N] runs the executors inside the driver's JVM: its 1g default
                       # loses task results of 1M-row joins.
                       "spark.driver.memory": "4g"}.items():
        builder = builder.config(key, value)
    session = builder.getOrCreate()
    session.sparkContext.setLogLevel("ERROR")
    return session


def text_recipe(root: Path):
    from cnclip.corpus.recipe import parse_recipe

    return parse_recipe({"name": "bench", "output_dir": str(root / "out"), "manifest_dir": str(root / "manifests"),
                         "sources": [{"name": "s", "kind": "metadata", "path": str(root / "none.csv")}]},
                        check_paths=False)


def write_ingest_parts(recipe) -> None:
    """PARTS ingest parts of captions built from a small vocabulary (so pair collapse and the
    caption cap both have work), as ingest writes them."""
    from cnclip.corpus.manifests.schemas import INGEST
    from cnclip.corpus.runtime.layout import BuildLayout

    rng = random.Random(0)
    folder = BuildLayout.of(recipe).ingest_dir
    per_part = -(-ROWS // PARTS)
    for part in range(PARTS):
        rows = range(part * per_part, min(ROWS, (part + 1) * per_part))
        captions = ["".join(rng.choice(WORDS) for _ in range(rng.randint(2, 5))) for _ in rows]
        INGEST.write(pl.DataFrame({
            "uid": list(rows), "source": "s", "row": list(rows),
            "url": [f"http://127.0.0.1/{rng.randrange(ROWS)}.jpg" for _ in rows], "caption_raw": captions,
        }, schema={"uid": pl.Int64, "source": pl.String, "row": pl.Int64, "url": pl.String,
                   "caption_raw": pl.String}), folder / f"000-{part:05d}.parquet")


def time_text(root: Path, engine) -> tuple[float, pl.DataFrame]:
    from cnclip.corpus.runtime.layout import BuildLayout
    from cnclip.corpus.stages.text import run_text_stage

    recipe = text_recipe(root)
    shutil.rmtree(BuildLayout.of(recipe).text_dir, ignore_errors=True)
    started = time.perf_counter()
    run_text_stage(recipe, engine)
    seconds = time.perf_counter() - started
    accepted = pl.read_parquet(BuildLayout.of(recipe).text_accepted_dir / "*.parquet").sort("uid")
    return seconds, accepted


def dedup_rows(root: Path) -> Path:
    """uid, sha256, phash, caption: bench_dedup's hashes (1% planted copies 1-4 bits away) and
    0.5% byte copies (equal sha256)."""
    from bench_dedup import synthetic

    hashes, _, _ = synthetic(ROWS)
    rng = np.random.default_rng(1)
    sha = np.array([f"sha{i}" for i in range(ROWS)], dtype=object)
    exact = rng.choice(ROWS - 1, ROWS // 200, replace=False)
    sha[exact + 1] = sha[exact]
    path = root / "dedup-rows.parquet"
    pl.DataFrame({"uid": np.arange(ROWS, dtype=np.int64), "sha256": sha.tolist(), "phash": hashes,
                  "caption": [f"c{i % 5000}" for i in range(ROWS)]},
                 schema={"uid": pl.Int64, "sha256": pl.String, "phash": pl.UInt64, "caption": pl.String}
                 ).write_parquet(path)
    return path


def main() -> None:
    from cnclip.corpus.manifests.schemas import DEDUP_DECISIONS
    from cnclip.corpus.ops.dedup import find_duplicates
    from cnclip.corpus.recipe import DedupSettings
    from cnclip.corpus.runtime.engine import LocalEngine
    from cnclip.corpus.runtime.spark_engine import SparkEngine

    root = Path(tempfile.mkdtemp(prefix="cnclip-bench-spark-"))
    try:
        write_ingest_parts(text_recipe(root))
        spark = SparkEngine(spark_session())
        spark.map_parts(abs, [1, 2], "warm-up")  # the Python workers' start is not the stage's
        local_text, local_accepted = time_text(root, LocalEngine(2))
        spark_text, spark_accepted = time_text(root, spark)
        assert local_accepted.equals(spark_accepted), "text: the engines disagree"
        print(f"text stage, {ROWS:,} rows ({local_accepted.height:,} accepted): local engine (2 processes) "
              f"{local_text:.1f} s, Spark local[2] {spark_text:.1f} s -> Spark/local {spark_text / local_text:.1f}x")

        rows = dedup_rows(root)
        settings = DedupSettings()
        started = time.perf_counter()
        local = find_duplicates(pl.scan_parquet(rows), settings)
        local_dedup = time.perf_counter() - started
        started = time.perf_counter()
        found = spark.find_duplicates(spark.scan([rows]), settings, None)
        spark.write(found, root / "decisions.parquet", DEDUP_DECISIONS)
        spark_dedup = time.perf_counter() - started
        assert pl.read_parquet(root / "decisions.parquet").equals(local), "dedup: the engines disagree"
        ratio = spark_dedup / local_dedup
        print(f"dedup (exact + near, d = 4), {ROWS:,} rows ({local.height:,} dropped): local engine (arrays) "
              f"{local_dedup:.1f} s, Spark local[2] {spark_dedup:.1f} s -> Spark/local {ratio:.1f}x")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
