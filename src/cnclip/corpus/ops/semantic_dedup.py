"""SemDeDup (Abbas et al. 2023): k-means over the image embeddings, then within each cluster every
sample whose cosine to a lower-uid sample exceeds max_similarity is a semantic duplicate.

Clustering first keeps the pairwise step to clusters (m² similarities for a cluster of m, never
n² for the build). The kept sample of a group is its lowest uid: the rule of the exact and near
dedup too, so a rebuild keeps the same rows. A duplicate names the kept sample it follows from
(a chain i -> j -> k of duplicates resolves to the kept k). Seeded k-means over the rows sorted
by uid: the same input gives the same decisions.
"""

from __future__ import annotations

import numpy as np
import polars as pl

from cnclip.corpus.manifests.schemas import DECISION_SCHEMA

REASON = "dedup:semantic_duplicate"


def cluster_of(embeddings: np.ndarray, clusters: int, seed: int) -> np.ndarray:
    """Each row's k-means cluster (faiss, spherical: the rows are unit vectors)."""
    import faiss

    n, width = embeddings.shape
    k = max(1, min(clusters, n))
    if k == 1:
        return np.zeros(n, np.int64)
    kmeans = faiss.Kmeans(width, k, niter=20, seed=seed, spherical=True, verbose=False, min_points_per_centroid=1,
                          max_points_per_centroid=1 << 30)
    kmeans.train(embeddings)
    _, assigned = kmeans.index.search(embeddings, 1)
    return assigned[:, 0].astype(np.int64)


def _cluster_duplicates(x: np.ndarray, max_similarity: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Within one cluster (rows in uid order): (dropped row indices, their kept row, the cosine)."""
    sim = x @ x.T
    earlier = np.where(np.tri(len(x), k=-1, dtype=bool), sim, -np.inf)  # [j, i]: i before j
    nearest = earlier.argmax(axis=1)
    dropped = earlier.max(axis=1) > max_similarity
    parent = np.where(dropped, nearest, np.arange(len(x)))
    while True:  # follow chains to a kept row: each step goes to a lower index, so it ends
        step = parent[parent]
        if np.array_equal(step, parent):
            break
        parent = step
    rows = np.flatnonzero(dropped)
    return rows, parent[rows], sim[rows, parent[rows]]


def semantic_duplicates(uids: np.ndarray, embeddings: np.ndarray, clusters: int, max_similarity: float,
                        seed: int = 0) -> pl.DataFrame:
    """One decision row (DECISION_SCHEMA) per semantic duplicate among `uids`."""
    order = np.argsort(uids, kind="stable")
    uids = np.asarray(uids)[order]
    x = np.ascontiguousarray(embeddings[order], dtype=np.float32)
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)  # float16 storage rounds the length
    if len(uids) < 2:
        return pl.DataFrame(schema=DECISION_SCHEMA)
    assigned = cluster_of(x, clusters, seed)
    dropped, kept, cosine, cluster = [], [], [], []
    for label in np.unique(assigned):  # one step per cluster, vectorized within it
        members = np.flatnonzero(assigned == label)
        if len(members) < 2:
            continue
        rows, parents, sims = _cluster_duplicates(x[members], max_similarity)
        dropped.append(uids[members[rows]])
        kept.append(uids[members[parents]])
        cosine.append(sims)
        cluster.append(np.full(len(rows), label))
    if not dropped:
        return pl.DataFrame(schema=DECISION_SCHEMA)
    frame = pl.DataFrame({"uid": np.concatenate(dropped), "duplicate_of_uid": np.concatenate(kept),
                          "cosine": np.concatenate(cosine), "cluster": np.concatenate(cluster)})
    return frame.select(
        pl.col("uid").cast(pl.Int64), pl.lit(REASON).alias("reason"), pl.col("duplicate_of_uid").cast(pl.Int64),
        pl.lit(None, pl.String).alias("duplicate_of_eval"),
        pl.format("image cosine {} > {} (cluster {})", pl.col("cosine").round(6), pl.lit(max_similarity),
                  pl.col("cluster")).alias("detail"),
    ).sort("uid")
