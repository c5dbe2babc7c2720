"""Dedup rules: exact copies, near-duplicate images, optional caption+image duplicates, and
decontamination against evaluation images — over the whole build, deterministically.

Rules, applied in this order; each dropped row names the row it duplicates:
1. exact: rows with the same sha256 of the original bytes; the first (lowest uid) is kept.
2. eval overlap: rows whose pHash is within `phash_max_distance` of any evaluation image.
3. near: rows whose pHashes are linked by chains of distance <= `phash_max_distance` form a group
   (connected components, so the result does not depend on processing order); the group's first
   row is kept.
4. text (off by default): rows with the same normalized caption whose images are within the
   looser `text_max_distance`: the same picture re-cropped or re-shot under the same caption.
"First" is uid order: source order, then row order.
"""

from __future__ import annotations

import numpy as np
import polars as pl

from cnclip.corpus.manifests.schemas import DECISION_SCHEMA
from cnclip.corpus.ops.band_buckets import BandBuckets
from cnclip.corpus.ops.neardup import component_labels, cross_pairs, equal_pairs, group_representatives, near_pairs
from cnclip.corpus.recipe import DedupSettings


def _decisions(uids, reason: str, duplicate_of_uid=None, duplicate_of_eval=None, detail: str | None = None,
               distances=None) -> pl.DataFrame:
    """One decision row per dropped uid, built column-wise. `detail` is a constant, or a template
    whose {} takes each row's pHash distance from `distances`."""
    count = len(uids)

    def column(values, dtype: pl.DataType) -> pl.Series:
        return pl.Series(values, dtype=dtype) if values is not None else pl.repeat(None, count, dtype=dtype, eager=True)

    frame = pl.DataFrame({"uid": column(uids, pl.Int64), "duplicate_of_uid": column(duplicate_of_uid, pl.Int64),
                          "duplicate_of_eval": column(duplicate_of_eval, pl.String),
                          "distance": column(distances, pl.Int64)})
    detail_expr = pl.format(detail, "distance") if distances is not None and detail else pl.lit(detail, pl.String)
    return frame.select(
        "uid", pl.lit(reason).alias("reason"), "duplicate_of_uid", "duplicate_of_eval", detail_expr.alias("detail")
    ).cast(DECISION_SCHEMA)


def exact_duplicates(rows: pl.LazyFrame) -> pl.DataFrame:
    """Rows whose original bytes (sha256) appeared at a lower uid."""
    first = rows.filter(pl.col("sha256").is_not_null()).group_by("sha256").agg(pl.col("uid").min().alias("first"))
    found = (
        rows.join(first, on="sha256", how="inner")
        .filter(pl.col("uid") != pl.col("first"))
        .select("uid", "first")
        .sort("uid")
        .collect()
    )
    return _decisions(found["uid"], "dedup:exact_duplicate", found["first"], detail="same sha256")


def eval_overlaps(uids: np.ndarray, hashes: np.ndarray, eval_ids: list[str], eval_hashes: np.ndarray,
                  max_distance: int) -> pl.DataFrame:
    """Training rows within `max_distance` of an evaluation image (the first such image is named):
    the band join of rows and evaluation images, then the lowest image index per row."""
    if len(eval_hashes) == 0 or len(uids) == 0:
        return _decisions([], "dedup:eval_overlap")
    rows, images = cross_pairs(hashes, eval_hashes, max_distance)
    first = np.full(len(uids), len(eval_hashes), dtype=np.int64)
    np.minimum.at(first, rows, images)
    rows = np.flatnonzero(first < len(eval_hashes))
    hit = first[rows]
    distances = np.bitwise_count(hashes[rows] ^ eval_hashes[hit])
    return _decisions(
        uids[rows], "dedup:eval_overlap", duplicate_of_eval=pl.Series(eval_ids, dtype=pl.String).gather(hit),
        detail="pHash distance {}", distances=distances,
    )


def near_duplicates(uids: np.ndarray, hashes: np.ndarray, max_distance: int) -> pl.DataFrame:
    """Rows (uid-sorted input) in a group of near-identical images other than its first row.

    Equal hashes are grouped first (so a value repeated k times costs k, not k*k candidates), the
    band search runs over one row per value, and only rows on a found edge enter the components:
    every other row is alone in its group and kept.
    """
    if len(uids) == 0:
        return _decisions([], "dedup:near_duplicate")
    hashes = np.ascontiguousarray(hashes, dtype=np.uint64)
    buckets = BandBuckets(hashes)  # one set of buffers for both searches
    later, first = equal_pairs(hashes, buckets)
    if len(later):
        distinct = np.ones(len(hashes), dtype=bool)
        distinct[later] = False
        distinct = np.flatnonzero(distinct)
        a, b = near_pairs(hashes[distinct], max_distance, reuse=buckets)
        a, b = distinct[a], distinct[b]
    else:
        a, b = near_pairs(hashes, max_distance, reuse=buckets)
    rows, keeper = component_labels(np.concatenate([a, later]), np.concatenate([b, first]))
    dropped = keeper != rows  # labels are the smallest row position: the lowest uid (uid-sorted)
    rows, keeper = rows[dropped], keeper[dropped]
    distances = np.bitwise_count(hashes[rows] ^ hashes[keeper])
    return _decisions(
        uids[rows], "dedup:near_duplicate", uids[keeper],
        detail="pHash distance {} to the kept image", distances=distances,
    )


def text_duplicates(rows: pl.DataFrame, max_distance: int) -> pl.DataFrame:
    """Same normalized caption and images within `max_distance`: grouped, the first row kept.

    Captions are capped in the text stage, so each caption's group is small and the self-join
    on the caption stays cheap.
    """
    pairs = (
        rows.join(rows, on="caption", suffix="_other")
        .filter(pl.col("uid") < pl.col("uid_other"))
        .filter((pl.col("phash") ^ pl.col("phash_other")).bitwise_count_ones() <= max_distance)
    )
    if pairs.height == 0:
        return _decisions([], "dedup:text_duplicate")
    uids = rows["uid"].to_numpy()  # uid-sorted (find_duplicates sorts), so positions by binary search
    a = np.searchsorted(uids, pairs["uid"].to_numpy())
    b = np.searchsorted(uids, pairs["uid_other"].to_numpy())
    group = group_representatives(len(uids), a, b)  # smallest position = lowest uid (rows uid-sorted)
    dropped = np.flatnonzero(group != np.arange(len(uids)))
    return _decisions(uids[dropped], "dedup:text_duplicate", uids[group[dropped]],
                      detail="same caption, near-identical image")


def find_duplicates(rows: pl.LazyFrame, settings: DedupSettings, eval_hashes: pl.DataFrame | None = None
                    ) -> pl.DataFrame:
    """rows: uid, sha256, phash (UInt64, null if unhashable), caption -> one decision per dropped row."""
    decisions = [exact_duplicates(rows)] if settings.exact else []
    dropped = pl.concat(decisions).select("uid") if decisions else pl.DataFrame(schema={"uid": pl.Int64})
    hashed = (
        rows.join(dropped.lazy(), on="uid", how="anti")
        .filter(pl.col("phash").is_not_null())
        .select("uid", "phash", "caption")
        .sort("uid")
        .collect()
    )
    d = settings.phash_max_distance
    if eval_hashes is not None and eval_hashes.height:
        found = eval_overlaps(hashed["uid"].to_numpy(), hashed["phash"].to_numpy(), eval_hashes["id"].to_list(),
                              eval_hashes["phash"].to_numpy(), d)
        decisions.append(found)
        hashed = hashed.join(found.select("uid"), on="uid", how="anti")
    if settings.near:
        found = near_duplicates(hashed["uid"].to_numpy(), hashed["phash"].to_numpy(), d)
        decisions.append(found)
        hashed = hashed.join(found.select("uid"), on="uid", how="anti")
    if settings.text:
        decisions.append(text_duplicates(hashed, settings.text_max_distance))
    if not decisions:
        return pl.DataFrame(schema=DECISION_SCHEMA)
    return pl.concat(decisions).sort("uid")
