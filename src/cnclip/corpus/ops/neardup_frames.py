"""The band search of neardup.py as DataFrame operations only: explode, join, filter, group by,
and an iterative join for the components. No step needs all rows in one process, so this is the
form a distributed engine (Spark SQL / DataFrames) runs; each step maps one-to-one to a Spark
operation. The local engine runs the array form in neardup.py (the same steps band by band,
numpy keys and a sort instead of a hash join, which is faster on one machine), and
the tests check the two give the same pairs, groups and kept rows.

A band key here is the hash masked to the band's bits: equal masked values, equal band keys.
"""

from __future__ import annotations

import polars as pl

from cnclip.corpus.ops.neardup import BandPlan


def band_keys(hashes: pl.LazyFrame, plan: BandPlan) -> pl.LazyFrame:
    """id, phash -> id, phash, band, key: one row per hash and band (the explode)."""
    masks = [sum(plan.masks[i] for i in band) for band in plan.bands]
    return (hashes.select("id", "phash",
                          pl.concat_list([pl.col("phash") & pl.lit(mask, pl.UInt64) for mask in masks]).alias("key"),
                          pl.lit(list(range(len(masks))), pl.List(pl.Int32)).alias("band"))
            .explode("key", "band"))


def near_pairs_frame(hashes: pl.LazyFrame, plan: BandPlan, max_distance: int) -> pl.LazyFrame:
    """id, phash (distinct ids) -> a, b (a < b): pairs within `max_distance` bits, each once."""
    keys = band_keys(hashes, plan)
    return (keys.join(keys, on=["band", "key"], suffix="_b")
            .filter(pl.col("id") < pl.col("id_b"))
            .filter((pl.col("phash") ^ pl.col("phash_b")).bitwise_count_ones() <= max_distance)
            .select(pl.col("id").alias("a"), pl.col("id_b").alias("b"))
            .unique())


def cross_pairs_frame(left: pl.LazyFrame, right: pl.LazyFrame, plan: BandPlan, max_distance: int) -> pl.LazyFrame:
    """Two id, phash tables -> a (left id), b (right id) within `max_distance` bits, each once."""
    return (band_keys(left, plan).join(band_keys(right, plan), on=["band", "key"], suffix="_b")
            .filter((pl.col("phash") ^ pl.col("phash_b")).bitwise_count_ones() <= max_distance)
            .select(pl.col("id").alias("a"), pl.col("id_b").alias("b"))
            .unique())


def components_frame(pairs: pl.DataFrame) -> pl.DataFrame:
    """a, b -> id, label: every id on a pair labelled with its component's smallest id, by label
    propagation that hooks labels (joins + group by) and shortcuts (self-joins), as neardup's
    component_labels does, until every pair's two labels agree."""
    edges = pairs.select("a", "b")
    labels = (pl.concat([edges.select(pl.col("a").alias("id")), edges.select(pl.col("b").alias("id"))])
              .unique().with_columns(pl.col("id").alias("label")))
    while True:
        ends = (edges.join(labels.rename({"id": "a", "label": "la"}), on="a")
                .join(labels.rename({"id": "b", "label": "lb"}), on="b")
                .filter(pl.col("la") != pl.col("lb")))
        if ends.height == 0:
            return labels.sort("id")
        hooks = (ends.group_by(pl.max_horizontal("la", "lb").alias("id"))
                 .agg(pl.min_horizontal("la", "lb").min().alias("hook")))
        labels = (labels.join(hooks, on="id", how="left")
                  .select("id", pl.min_horizontal("label", "hook").alias("label")))
        while True:  # shortcut until every label is its own label
            jumped = (labels.join(labels.rename({"id": "label", "label": "jumped"}), on="label")
                      .select("id", pl.col("jumped").alias("label")))
            if jumped.join(labels, on="id", suffix="_old").filter(pl.col("label") != pl.col("label_old")).height == 0:
                break
            labels = jumped


def near_duplicates_frame(rows: pl.LazyFrame, plan: BandPlan, max_distance: int) -> pl.DataFrame:
    """uid, phash -> uid, duplicate_of_uid for every row in a group other than its lowest uid.
    Equal hashes are one value first (group by phash, its lowest uid as its id)."""
    values = rows.group_by("phash").agg(pl.col("uid").min().alias("id"))
    pairs = near_pairs_frame(values, plan, max_distance).collect()
    labels = components_frame(pairs)
    return (rows.join(values, on="phash")
            .join(labels.lazy(), on="id", how="left")
            .select("uid", pl.coalesce("label", "id").alias("duplicate_of_uid"))
            .filter(pl.col("uid") != pl.col("duplicate_of_uid"))
            .sort("uid")
            .collect())
