"""The dedup rules of dedup.py on Spark DataFrames: the relational form of neardup_frames.py
(band-key explode -> equal-key join -> popcount verify -> connected components by label
propagation), step for step, so no step gathers every row in one process.

Spark has no unsigned 64-bit type: it reads the UInt64 pHashes of the hash parts as
DECIMAL(20,0). Here they are reinterpreted as signed BIGINTs (the same 64 bits), on which `&`,
`^` and `bit_count` give what they give on the unsigned values; the decisions carry no hash.

The rules, their order and their results are those of dedup.find_duplicates (the tests compare
the two on planted near-duplicates): exact copies by sha256, evaluation overlap, near-duplicate
groups (their lowest uid kept), then, if on, caption + image duplicates.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from cnclip.corpus.ops.neardup import BandPlan, band_plan

if TYPE_CHECKING:
    import polars as pl

    from cnclip.corpus.recipe import DedupSettings

_DECISION_TYPES = {"uid": "bigint", "reason": "string", "duplicate_of_uid": "bigint",
                   "duplicate_of_eval": "string", "detail": "string"}


def _signed(value: int) -> int:
    """An unsigned 64-bit value as the signed one of the same bits."""
    return value - (1 << 64) if value >= 1 << 63 else value


def signed_hash(column: str) -> Any:
    """A pHash column (DECIMAL(20,0) as Spark reads UInt64, or already BIGINT) as a signed BIGINT."""
    return F.expr(f"CAST(CASE WHEN {column} >= 9223372036854775808 THEN {column} - 18446744073709551616 "
                  f"ELSE {column} END AS BIGINT)")


def checkpoint(frame: DataFrame) -> DataFrame:
    """The frame computed once and its plan cut: reliably (to spark.checkpoint.dir) where the
    session has a checkpoint folder, which survives executors that dynamic allocation removes;
    otherwise in the executors' storage (localCheckpoint)."""
    if frame.sparkSession.sparkContext.getCheckpointDir():
        return frame.checkpoint()
    return frame.localCheckpoint()


def band_keys(hashes: DataFrame, plan: BandPlan) -> DataFrame:
    """id, phash -> id, phash, band, key: one row per hash and band (the explode)."""
    masks = [_signed(sum(plan.masks[i] for i in band)) for band in plan.bands]
    keys = F.array(*[F.col("phash").bitwiseAND(F.lit(mask)) for mask in masks])
    return hashes.select("id", "phash", F.posexplode(keys).alias("band", "key"))


def _within(distance: int) -> Any:
    return F.bit_count(F.col("phash").bitwiseXOR(F.col("phash_b"))) <= distance


def _other(keys: DataFrame) -> DataFrame:
    return keys.select(F.col("id").alias("id_b"), F.col("phash").alias("phash_b"), "band", "key")


def near_pairs(values: DataFrame, plan: BandPlan, max_distance: int) -> DataFrame:
    """id, phash (distinct ids) -> a, b (a < b) within `max_distance` bits, each pair once."""
    keys = band_keys(values, plan)
    return (keys.join(_other(keys), ["band", "key"]).where(F.col("id") < F.col("id_b")).where(_within(max_distance))
            .select(F.col("id").alias("a"), F.col("id_b").alias("b")).distinct())


def cross_pairs(left: DataFrame, right: DataFrame, plan: BandPlan, max_distance: int) -> DataFrame:
    """Two id, phash tables -> a (left id), b (right id) within `max_distance` bits, each once."""
    return (band_keys(left, plan).join(_other(band_keys(right, plan)), ["band", "key"]).where(_within(max_distance))
            .select(F.col("id").alias("a"), F.col("id_b").alias("b")).distinct())


def _same(first: DataFrame, second: DataFrame) -> bool:
    """Whether two id, label tables agree on every id (one Spark job)."""
    renamed = second.select("id", F.col("label").alias("before"))
    return first.join(renamed, "id").where(F.col("label") != F.col("before")).isEmpty()


def components(pairs: DataFrame) -> DataFrame:
    """a, b -> id, label: every id on a pair labelled with its component's smallest id.

    Label propagation as in neardup_frames.components_frame: hook each disagreeing pair's larger
    label to its smaller one (a join and a group by), then shortcut labels to their labels' labels
    until nothing changes; repeat until every pair's two labels agree. Each round's labels are
    checkpointed, so the plans Spark keeps do not grow with the rounds."""
    edges = pairs.select("a", "b").transform(checkpoint)
    labels = (edges.select(F.col("a").alias("id")).union(edges.select(F.col("b").alias("id"))).distinct()
              .withColumn("label", F.col("id")).transform(checkpoint))
    while True:
        ends = (edges.join(labels.select(F.col("id").alias("a"), F.col("label").alias("la")), "a")
                .join(labels.select(F.col("id").alias("b"), F.col("label").alias("lb")), "b")
                .where(F.col("la") != F.col("lb")))
        if ends.isEmpty():
            return labels
        hooks = ends.groupBy(F.greatest("la", "lb").alias("id")).agg(F.min(F.least("la", "lb")).alias("hook"))
        labels = (labels.join(hooks, "id", "left").select("id", F.least("label", "hook").alias("label"))
                  .transform(checkpoint))
        while True:
            jumped = (labels.join(labels.select(F.col("id").alias("label"), F.col("label").alias("jumped")), "label")
                      .select("id", F.col("jumped").alias("label")).transform(checkpoint))
            if _same(jumped, labels):
                break
            labels = jumped


def _decisions(found: DataFrame, reason: str, detail: Any) -> DataFrame:
    """uid, duplicate_of_uid, duplicate_of_eval (where there) -> DECISION_SCHEMA's columns."""
    columns = set(found.columns)
    return found.select(*(
        (F.lit(reason) if name == "reason" else detail if name == "detail"
         else F.col(name) if name in columns else F.lit(None)).cast(dtype).alias(name)
        for name, dtype in _DECISION_TYPES.items()))


def _distance_text(template: str, distance: Any) -> Any:
    return F.format_string(template, distance)


def exact_duplicates(rows: DataFrame) -> DataFrame:
    """Rows whose original bytes (sha256) appeared at a lower uid."""
    first = rows.where(F.col("sha256").isNotNull()).groupBy("sha256").agg(F.min("uid").alias("duplicate_of_uid"))
    found = rows.join(first, "sha256").where(F.col("uid") != F.col("duplicate_of_uid"))
    return _decisions(found, "dedup:exact_duplicate", F.lit("same sha256"))


def eval_overlaps(spark: SparkSession, hashed: DataFrame, evals: pl.DataFrame, max_distance: int) -> DataFrame:
    """Rows within `max_distance` of an evaluation image, naming the first such image (the eval
    set is small: it is read on the driver and handed to Spark as a table)."""
    import polars as pl

    table = evals.with_row_index("index").select(pl.col("index").cast(pl.Int64), pl.col("id").alias("eval_id"),
                                                 pl.col("phash").reinterpret(signed=True))
    images = spark.createDataFrame(table.rows(), "index bigint, eval_id string, phash bigint")
    plan = band_plan(hashed.count(), max_distance, len(table))
    rows = hashed.select(F.col("uid").alias("id"), "phash")
    first = (cross_pairs(rows, images.select(F.col("index").alias("id"), "phash"), plan, max_distance)
             .groupBy(F.col("a").alias("uid")).agg(F.min("b").alias("index")))
    found = (first.join(hashed, "uid").join(images.select("index", "eval_id", F.col("phash").alias("eval_phash")),
                                            "index")
             .select("uid", F.col("eval_id").alias("duplicate_of_eval"),
                     F.bit_count(F.col("phash").bitwiseXOR(F.col("eval_phash"))).alias("distance")))
    return _decisions(found, "dedup:eval_overlap", _distance_text("pHash distance %d", F.col("distance")))


def near_duplicates(hashed: DataFrame, max_distance: int) -> DataFrame:
    """Rows in a group of near-identical images other than its lowest uid. Equal hashes are one
    value first (its lowest uid as its id), as in neardup_frames.near_duplicates_frame."""
    values = hashed.groupBy("phash").agg(F.min("uid").alias("id")).transform(checkpoint)
    count = values.count()
    if max_distance > 0 and count > 1:
        labels = components(near_pairs(values, band_plan(count, max_distance), max_distance))
    else:
        labels = hashed.sparkSession.createDataFrame([], "id bigint, label bigint")
    kept = hashed.select(F.col("uid").alias("duplicate_of_uid"), F.col("phash").alias("kept_phash"))
    found = (hashed.join(values, "phash").join(labels, "id", "left")
             .select("uid", "phash", F.coalesce("label", "id").alias("duplicate_of_uid"))
             .where(F.col("uid") != F.col("duplicate_of_uid"))
             .join(kept, "duplicate_of_uid")
             .withColumn("distance", F.bit_count(F.col("phash").bitwiseXOR(F.col("kept_phash")))))
    return _decisions(found, "dedup:near_duplicate",
                      _distance_text("pHash distance %d to the kept image", F.col("distance")))


def text_duplicates(hashed: DataFrame, max_distance: int) -> DataFrame:
    """Same normalized caption and images within `max_distance`: grouped, the lowest uid kept."""
    other = hashed.select(F.col("uid").alias("b"), F.col("phash").alias("phash_b"), "caption")
    pairs = (hashed.join(other, "caption").where(F.col("uid") < F.col("b")).where(_within(max_distance))
             .select(F.col("uid").alias("a"), "b"))
    labels = components(pairs)
    found = labels.where(F.col("id") != F.col("label")).select(F.col("id").alias("uid"),
                                                               F.col("label").alias("duplicate_of_uid"))
    return _decisions(found, "dedup:text_duplicate", F.lit("same caption, near-identical image"))


def find_duplicates(spark: SparkSession, rows: DataFrame, settings: DedupSettings,
                    eval_hashes: pl.DataFrame | None = None) -> DataFrame:
    """rows: uid, sha256, phash (null if unhashable), caption -> one decision per dropped row, by
    uid; each rule runs on the rows the rules before it kept."""
    rows = rows.select("uid", "sha256", signed_hash("phash").alias("phash"), "caption").transform(checkpoint)
    decisions = [exact_duplicates(rows).transform(checkpoint)] if settings.exact else []
    hashed = rows.where(F.col("phash").isNotNull()).select("uid", "phash", "caption")
    d = settings.phash_max_distance
    steps = []
    if eval_hashes is not None and eval_hashes.height:
        steps.append(lambda kept: eval_overlaps(spark, kept, eval_hashes, d))
    if settings.near:
        steps.append(lambda kept: near_duplicates(kept, d))
    if settings.text:
        steps.append(lambda kept: text_duplicates(kept, settings.text_max_distance))
    for step in steps:
        for earlier in decisions[-1:]:
            hashed = hashed.join(earlier.select("uid"), "uid", "left_anti")
        hashed = hashed.transform(checkpoint)
        decisions.append(step(hashed).transform(checkpoint))
    if not decisions:
        return spark.createDataFrame([], ", ".join(f"{n} {t}" for n, t in _DECISION_TYPES.items()))
    found = decisions[0]
    for more in decisions[1:]:
        found = found.unionByName(more)
    return found.orderBy("uid")
