"""The corpus stages' per-row costs on ROWS synthetic rows (default 1M), for the README's cost
model: the text, dedup and shard-plan stages on the local engine against the Spark engine on
local[2], in the same run, on the same inputs, and the two steps the driver runs on either engine
(ingest, the download's routing). The ratio is Spark's fixed cost on one
machine (task scheduling, JVM <-> Python transfers, shuffles to local disk): what running on a
cluster costs before it gains anything. Both engines must give the same outputs (checked).

Per stage and engine it prints the median of REPEATS runs (CNCLIP_BENCH_REPEATS, default 3):
seconds, rows/s per core (the rows the stage reads / seconds / the 2 cores both engines are given:
LocalEngine(2), local[2]), the bytes Spark shuffled (the driver's status store: the difference of
the executors' totalShuffleWrite before and after the stage, which the listener updates as tasks
end, so it is exact and needs no UI), and peak memory: the Python driver's resident set, and on
Spark the JVM's (which on local[N] holds the executors too). Peaks are the kernel's VmHWM of each
process, reset before each run (/proc/PID/clear_refs), so each run's peak includes what the
process already held when it began (routing runs in a fresh process each time, so its figure is
its own). The stages: ingest (one metadata file), text (normalize, filter, pair collapse, caption
cap), routing (160 lanes, 10,000 hosts), dedup (exact + near, d = 4) and the shard plan
(positions, keys, the plan's one file).

CNCLIP_BENCH_ROWS=100000 for a quick run. CNCLIP_BENCH_SMALL=1 (bench/sizes.py) makes the defaults
20,000 rows in 2 parts, 2 shuffle partitions and 1 run (the variables above still win).
"""

from __future__ import annotations

import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from sizes import announce, size

ROWS = int(os.environ.get("CNCLIP_BENCH_ROWS", size(1_000_000, 20_000)))
PARTS = size(8, 2)  # ingest parts: the text stage's tasks
SHUFFLE_PARTITIONS = size("8", "2")
# Two in small mode: a repeat meets what the run before it left (Spark's plan is a folder).
REPEATS = int(os.environ.get("CNCLIP_BENCH_REPEATS", size(3, 2)))
CORES = 2  # LocalEngine(2) and local[2]
WORDS = ["一隻貓", "在沙發上", "睡覺", "美丽的", "风景", "高清壁纸", "的照片", "北京", "上海", "夕陽下的", "海邊",
         "小狗", "公园里", "奔跑", "IMG_2023", "a photo of"]


def spark_session():
    from pyspark.sql import SparkSession

    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)  # the workers import this venv's cnclip
    builder = SparkSession.builder.master("local[2]").appName("cnclip-bench")
    for key, value in {"spark.driver.host": "127.0.0.1", "spark.driver.bindAddress": "127.0.0.1",
                       "spark.ui.enabled": "false", "spark.ui.showConsoleProgress": "false",
                       "spark.sql.shuffle.partitions": SHUFFLE_PARTITIONS,
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


def text_once(root: Path, engine) -> None:
    from cnclip.corpus.runtime.layout import BuildLayout
    from cnclip.corpus.stages.text import run_text_stage

    recipe = text_recipe(root)
    shutil.rmtree(BuildLayout.of(recipe).text_dir, ignore_errors=True)
    run_text_stage(recipe, engine)


def accepted_rows(root: Path) -> pl.DataFrame:
    from cnclip.corpus.runtime.layout import BuildLayout

    return pl.read_parquet(Path(BuildLayout.of(text_recipe(root)).text_accepted_dir) / "*.parquet").sort("uid")


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


def _peak_kib(pid: int | str = "self", reset: bool = False, field: str = "VmHWM") -> int | None:
    """The process's peak resident set (VmHWM, KiB; or another field of its status, VmRSS); with
    reset, set the peak back to what it holds now first. None where /proc does not say."""
    try:
        if reset:
            Path(f"/proc/{pid}/clear_refs").write_text("5")
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


@dataclass
class Measured:
    seconds: float
    shuffled: int | None  # bytes written to Spark shuffles (None: the local engine)
    python_kib: int | None
    python_grew_kib: int | None  # the peak over what the driver held when the run began
    jvm_kib: int | None


class Probe:
    """Wall time, shuffle bytes and peak memory of one run of a stage (see the module docstring)."""

    def __init__(self, session=None):
        self.session = session
        self.jvm_pid = None if session is None else session.sparkContext._jvm.java.lang.management.\
            ManagementFactory.getRuntimeMXBean().getPid()

    def shuffle_written(self) -> int | None:
        if self.session is None:
            return None
        context = self.session.sparkContext._jsc.sc()
        try:
            context.listenerBus().waitUntilEmpty()  # the last tasks' ends reach the status store
        except Exception:  # not reachable in this Spark: a moment is enough on one machine
            time.sleep(1.0)
        executors = context.statusStore().executorList(False)
        return sum(executors.apply(i).totalShuffleWrite() for i in range(executors.size()))

    def run(self, fn) -> tuple[Measured, object]:
        before = self.shuffle_written()
        _peak_kib(reset=True)
        held = _peak_kib(field="VmRSS")
        if self.jvm_pid is not None:
            _peak_kib(self.jvm_pid, reset=True)
        started = time.perf_counter()
        result = fn()
        seconds = time.perf_counter() - started
        after = self.shuffle_written()
        peak = _peak_kib()
        return Measured(seconds, None if before is None else after - before, peak,
                        None if peak is None or held is None else max(0, peak - held),
                        None if self.jvm_pid is None else _peak_kib(self.jvm_pid)), result


def repeated(probe: Probe, fn) -> tuple[list[Measured], object]:
    runs, result = [], None
    for _ in range(REPEATS):
        measured, result = probe.run(fn)
        runs.append(measured)
    return runs, result


def _median(values) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def report(stage: str, rows: int, engine: str, runs: list[Measured], cores: int = CORES) -> float:
    """One line of medians (the range of seconds beside them); returns the median seconds. A
    step of the driver's own counts as one core (polars' threads may use the second)."""
    seconds = _median(r.seconds for r in runs)
    parts = [f"{stage:<10} {engine:<14} {seconds:6.1f} s ({min(r.seconds for r in runs):.1f}-"
             f"{max(r.seconds for r in runs):.1f}, {len(runs)} runs)",
             f"{rows / seconds / cores:>10,.0f} rows/s per core"]
    shuffled = _median(r.shuffled for r in runs)
    if shuffled is not None:
        parts.append(f"shuffled {shuffled / 2**20:,.0f} MiB ({shuffled / rows:,.0f} B/row)")
    python = _median(r.python_kib for r in runs)
    if python is not None:
        grew = _median(r.python_grew_kib for r in runs)
        parts.append(f"Python driver peak {python / 1024:,.0f} MiB (+{grew / 1024:,.0f} MiB, "
                     f"{grew * 1024 / rows:,.0f} B/row)")
    jvm = _median(r.jvm_kib for r in runs)
    if jvm is not None:
        parts.append(f"JVM peak {jvm / 1024:,.0f} MiB")
    print(" | ".join(parts), flush=True)
    return seconds


def write_shard_inputs(root: Path, decisions: pl.DataFrame, hashes: Path) -> None:
    """What the shard plan reads besides the text stage's accepted parts: every accepted row
    downloaded (an attempts table), dedup's decisions and the hashes, where the layout puts them."""
    from cnclip.corpus.manifests.schemas import ATTEMPTS, DEDUP_DECISIONS, HASHES
    from cnclip.corpus.runtime.layout import BuildLayout
    from cnclip.corpus.stages.download_attempts import attempts_path

    layout = BuildLayout.of(text_recipe(root))
    uids = pl.read_parquet(Path(layout.text_accepted_dir) / "*.parquet", columns=["uid"]).sort("uid")["uid"]
    size = pl.lit(256, pl.Int32)
    attempts = pl.DataFrame({"uid": uids}).with_columns(
        (pl.col("uid") // 10_000).alias("part"),
        pl.format("{}.tar", (pl.col("uid") // 10_000).cast(pl.String).str.zfill(5)).alias("tar"),
        pl.col("uid").cast(pl.String).str.zfill(9).alias("key"), pl.lit("success").alias("status"),
        pl.lit(None, pl.String).alias("reason"), pl.lit(None, pl.String).alias("detail"),
        size.alias("width"), size.alias("height"), size.alias("original_width"), size.alias("original_height"),
        pl.format("sha{}", pl.col("uid")).alias("sha256"))
    for folder in (layout.download_dir, layout.hash_dir, Path(layout.dedup_decisions).parent):
        Path(folder).mkdir(parents=True, exist_ok=True)
    ATTEMPTS.write(attempts, Path(attempts_path(layout.download_dir)))
    DEDUP_DECISIONS.write(decisions, Path(layout.dedup_decisions))
    HASHES.write(pl.read_parquet(hashes, columns=["uid", "phash"]), Path(layout.hash_dir) / "00000.parquet")


def plan_once(root: Path, engine) -> pl.DataFrame:
    from cnclip.corpus.runtime import storage
    from cnclip.corpus.runtime.layout import BuildLayout
    from cnclip.corpus.stages.shard import plan_shards

    recipe = text_recipe(root)
    storage.remove(BuildLayout.of(recipe).shard_plan)  # a file, or the folder Spark writes it as
    plan_shards(recipe, engine)
    return pl.read_parquet(BuildLayout.of(recipe).shard_plan)


def route_once(root: Path) -> dict:
    """The download's routing before the lanes start, for 160 lanes (10 executors x 16 cores) and
    10,000 hosts, in a fresh process (so the peak is the routing's, not what earlier stages left
    in the allocator): the rows in memory, then the routing's engine steps (its queries, the
    lanes' Arrow inputs and the plan) on the local engine in that one process."""
    from cnclip.corpus.stages.download_routing import write_plan

    sent = accepted_rows(root).select("uid", pl.format("http://h{}.example/{}.jpg", pl.col("uid") % 10_000,
                                                       pl.col("uid")).alias("url"), "caption")
    held = _peak_kib(reset=True, field="VmRSS")
    folder = root / "download-input"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    started = time.perf_counter()
    write_plan(sent, folder, "plan.parquet", lanes=160, per_host=1, per_part=10_000, first_part=0)
    return {"seconds": time.perf_counter() - started, "rows": sent.height, "arrow": sent.estimated_size(),
            "url": sent["url"].str.len_bytes().mean(), "caption": sent["caption"].str.len_bytes().mean(),
            "held": held, "peak": _peak_kib()}


def report_routing(root: Path) -> None:
    """route_once REPEATS times, each in a spawned process: the median time, the rows' own size
    and what routing needs over them, per row."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    runs = []
    for _ in range(REPEATS):
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            runs.append(pool.submit(route_once, root).result())
    first, rows = runs[0], runs[0]["rows"]
    seconds = statistics.median(r["seconds"] for r in runs)
    over = statistics.median(r["peak"] - r["held"] for r in runs) * 1024 if first["peak"] else float("nan")
    print(f"routing    one process    {seconds:6.1f} s ({len(runs)} runs, one process each) | "
          f"{rows / seconds:>10,.0f} rows/s per core | the rows {first['arrow'] / rows:,.0f} B/row in memory "
          f"(urls {first['url']:.0f} B, captions {first['caption']:.0f} B) + routing's peak over them "
          f"{over / rows:,.0f} B/row", flush=True)


def ingest_once(root: Path) -> None:
    """Ingest as the driver runs it on either engine: one metadata file of ROWS rows (PARTS
    files would be the same work, one after the other) read, numbered and written as a part."""
    from cnclip.corpus.recipe import parse_recipe
    from cnclip.corpus.stages.ingest import ingest

    folder = root / "ingest-bench"
    shutil.rmtree(folder / "out", ignore_errors=True)
    ingest(parse_recipe({"name": "bench-ingest", "output_dir": str(folder / "out"),
                         "manifest_dir": str(folder / "manifests"),
                         "sources": [{"name": "s", "kind": "metadata", "path": str(folder / "rows.parquet")}]}))


def write_metadata(root: Path) -> None:
    """The ingest parts' urls and captions as one metadata file, as a user's would be."""
    from cnclip.corpus.runtime.layout import BuildLayout

    folder = root / "ingest-bench"
    folder.mkdir()
    (pl.scan_parquet(Path(BuildLayout.of(text_recipe(root)).ingest_dir) / "*.parquet")
     .select("url", pl.col("caption_raw").alias("caption")).sink_parquet(folder / "rows.parquet"))


def main() -> None:
    from cnclip.corpus.manifests.schemas import DEDUP_DECISIONS
    from cnclip.corpus.ops.dedup import find_duplicates
    from cnclip.corpus.recipe import DedupSettings
    from cnclip.corpus.runtime.engine import LocalEngine
    from cnclip.corpus.runtime.spark_engine import SparkEngine

    announce()
    root = Path(tempfile.mkdtemp(prefix="cnclip-bench-spark-"))
    try:
        print(f"{ROWS:,} rows, {CORES} cores per engine, load average {os.getloadavg()[0]:.1f} at the start",
              flush=True)
        write_ingest_parts(text_recipe(root))
        session = spark_session()
        spark = SparkEngine(session)
        spark.map_parts(abs, [1, 2], "warm-up")  # the Python workers' start is not the stage's
        local_probe, spark_probe = Probe(), Probe(session)
        write_metadata(root)
        runs, _ = repeated(local_probe, lambda: ingest_once(root))
        report("ingest", ROWS, "driver (both)", runs, cores=1)

        runs, _ = repeated(local_probe, lambda: text_once(root, LocalEngine(CORES)))
        local_text = report("text", ROWS, "local engine", runs)
        local_accepted = accepted_rows(root)
        runs, _ = repeated(spark_probe, lambda: text_once(root, spark))
        spark_text = report("text", ROWS, "Spark local[2]", runs)
        spark_accepted = accepted_rows(root)
        assert local_accepted.equals(spark_accepted), "text: the engines disagree"
        print(f"text: {local_accepted.height:,} accepted; Spark/local {spark_text / local_text:.1f}x", flush=True)

        local_accepted_height = local_accepted.height
        del local_accepted, spark_accepted
        report_routing(root)

        rows = dedup_rows(root)
        settings = DedupSettings()
        runs, local = repeated(local_probe, lambda: find_duplicates(pl.scan_parquet(rows), settings))
        local_dedup = report("dedup", ROWS, "local engine", runs)

        def spark_dedup_once() -> None:
            found = spark.find_duplicates(spark.scan([rows]), settings, None)
            spark.write(found, root / "decisions.parquet", DEDUP_DECISIONS)

        runs, _ = repeated(spark_probe, spark_dedup_once)
        spark_dedup = report("dedup", ROWS, "Spark local[2]", runs)
        assert pl.read_parquet(root / "decisions.parquet").equals(local), "dedup: the engines disagree"
        print(f"dedup (exact + near, d = 4): {local.height:,} dropped; Spark/local {spark_dedup / local_dedup:.1f}x",
              flush=True)

        write_shard_inputs(root, local, rows)
        runs, local_plan = repeated(local_probe, lambda: plan_once(root, LocalEngine(CORES)))
        local_shard = report("shard plan", local_accepted_height, "local engine", runs)
        runs, spark_plan = repeated(spark_probe, lambda: plan_once(root, spark))
        spark_shard = report("shard plan", local_accepted_height, "Spark local[2]", runs)
        assert local_plan.equals(spark_plan), "shard plan: the engines disagree"
        print(f"shard plan: {local_plan.height:,} samples; Spark/local {spark_shard / local_shard:.1f}x", flush=True)
        print(f"load average {os.getloadavg()[0]:.1f} at the end")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
