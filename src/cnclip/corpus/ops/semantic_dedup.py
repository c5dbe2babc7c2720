"""SemDeDup (Abbas et al. 2023): k-means over the image embeddings, then within each cluster every
sample whose cosine to a lower-uid sample exceeds max_similarity is a semantic duplicate.

Clustering first keeps the pairwise step to clusters (m² similarities for a cluster of m, never
n² for the build), and a cluster larger than a block is compared block by block, so the memory of
that step is a block's similarities, not m². The kept sample of a group is its lowest uid: the
rule of the exact and near dedup too, so a rebuild keeps the same rows. A duplicate names the kept
sample it follows from (a chain i -> j -> k of duplicates resolves to the kept k). Seeded k-means
over the rows sorted by uid: the same input gives the same decisions.

The pieces run apart in a build (stages/embed_semantic.py): k-means is trained on a sample drawn
by `draw` (`train_centroids`), every part's rows are assigned by `assign`, and each group of
clusters is compared by `cluster_decisions`; `semantic_duplicates` is the same rule on arrays in
memory, every row in the sample.
"""

from __future__ import annotations

import numpy as np
import polars as pl

from cnclip.corpus.manifests.schemas import DECISION_SCHEMA

REASON = "dedup:semantic_duplicate"
# Rows of a cluster compared at once: a block's similarities are BLOCK_ROWS² float32 (64 MiB).
BLOCK_ROWS = 4096
_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def draw(uids: np.ndarray, seed: int) -> np.ndarray:
    """Each uid's draw, a uint64 mix (splitmix64) of the uid and the seed: the sample is the rows
    of the smallest draws, the same rows whichever part or task a row is read in."""
    z = np.asarray(uids).astype(np.uint64) ^ np.uint64((seed * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF)
    with np.errstate(over="ignore"):
        z = (z + np.uint64(0x9E3779B97F4A7C15)) & _MASK64
        z = ((z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _MASK64
        z = ((z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _MASK64
    return z ^ (z >> np.uint64(31))


def unit_rows(embeddings: np.ndarray) -> np.ndarray:
    """float32 rows of unit length (float16 storage rounds the length)."""
    x = np.array(embeddings, dtype=np.float32)  # a copy: the caller's array is left as it is
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return x


def train_centroids(x: np.ndarray, clusters: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(centroids [k, width], rows of `x` nearest each) of seeded spherical k-means (faiss) over
    the unit rows `x`, k = min(clusters, rows); one cluster is the rows' mean direction."""
    import faiss

    n, width = x.shape
    k = max(1, min(clusters, n))
    if k == 1:
        return unit_rows(x.mean(axis=0, keepdims=True)), np.array([n], np.int64)
    # every row trains (max_points_per_centroid): the caller has already drawn the sample
    kmeans = faiss.Kmeans(width, k, niter=20, seed=seed, spherical=True, verbose=False, min_points_per_centroid=1,
                          max_points_per_centroid=1 << 30)
    kmeans.train(x)
    centroids = np.ascontiguousarray(kmeans.centroids, dtype=np.float32)
    return centroids, np.bincount(assign(x, centroids), minlength=k).astype(np.int64)


def assign(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Each unit row's cluster: the centroid of the largest inner product (what spherical k-means
    assigns by)."""
    import faiss

    if len(centroids) == 1:
        return np.zeros(len(x), np.int64)
    index = faiss.IndexFlatIP(centroids.shape[1])
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    _, assigned = index.search(np.ascontiguousarray(x, dtype=np.float32), 1)
    return assigned[:, 0].astype(np.int64)


def _resolve(parent: np.ndarray) -> np.ndarray:
    """Follow chains to a kept row: each step goes to a lower index, so it ends."""
    while True:
        step = parent[parent]
        if np.array_equal(step, parent):
            return parent
        parent = step


def _whole_cluster(x: np.ndarray, max_similarity: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A cluster within one block: its m x m similarities at once."""
    sim = x @ x.T
    earlier = np.where(np.tri(len(x), k=-1, dtype=bool), sim, -np.inf)  # [j, i]: i before j
    nearest = earlier.argmax(axis=1)
    dropped = earlier.max(axis=1) > max_similarity
    parent = _resolve(np.where(dropped, nearest, np.arange(len(x))))
    rows = np.flatnonzero(dropped)
    return rows, parent[rows], sim[rows, parent[rows]]


def _blocked_cluster(x: np.ndarray, max_similarity: float, block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The same rule, rows in uid order against every earlier row a block at a time: each row's
    first most similar earlier row, as the whole matrix's argmax finds it (a later block replaces
    it only when strictly more similar)."""
    m = len(x)
    best = np.full(m, -np.inf, np.float32)
    nearest = np.zeros(m, np.int64)
    for j0 in range(0, m, block):
        rows = x[j0:j0 + block]
        for i0 in range(0, j0 + 1, block):
            sim = rows @ x[i0:i0 + block].T
            if i0 == j0:
                sim[~np.tri(*sim.shape, k=-1, dtype=bool)] = -np.inf
            arg = sim.argmax(axis=1)
            value = sim[np.arange(len(rows)), arg]
            better = value > best[j0:j0 + len(rows)]
            best[j0:j0 + len(rows)][better] = value[better]
            nearest[j0:j0 + len(rows)][better] = arg[better] + i0
    dropped = best > max_similarity
    parent = _resolve(np.where(dropped, nearest, np.arange(m)))
    rows = np.flatnonzero(dropped)
    return rows, parent[rows], np.einsum("ij,ij->i", x[rows], x[parent[rows]])


def cluster_duplicates(x: np.ndarray, max_similarity: float,
                       block: int = BLOCK_ROWS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Within one cluster (unit rows in uid order): (dropped row indices, their kept row, the
    cosine), the similarities a block x block at a time when the cluster exceeds a block."""
    if len(x) <= block:
        return _whole_cluster(x, max_similarity)
    return _blocked_cluster(x, max_similarity, block)


def decisions_frame(uids: np.ndarray, kept: np.ndarray, cosine: np.ndarray, cluster: np.ndarray,
                    max_similarity: float) -> pl.DataFrame:
    """DECISION_SCHEMA rows of the dropped `uids`, each naming its kept uid, sorted by uid."""
    frame = pl.DataFrame({"uid": uids, "duplicate_of_uid": kept, "cosine": cosine, "cluster": cluster})
    return frame.select(
        pl.col("uid").cast(pl.Int64), pl.lit(REASON).alias("reason"), pl.col("duplicate_of_uid").cast(pl.Int64),
        pl.lit(None, pl.String).alias("duplicate_of_eval"),
        pl.format("image cosine {} > {} (cluster {})", pl.col("cosine").round(6), pl.lit(max_similarity),
                  pl.col("cluster")).alias("detail"),
    ).sort("uid")


def cluster_decisions(uids: np.ndarray, x: np.ndarray, assigned: np.ndarray, max_similarity: float,
                      block: int = BLOCK_ROWS) -> pl.DataFrame:
    """The decisions among rows sorted by uid (`x` unit rows) with their clusters, cluster by
    cluster (one step per cluster, vectorized within it)."""
    dropped, kept, cosine, cluster = [], [], [], []
    # Members of each cluster by one stable sort (still in uid order), not a scan of every row per cluster.
    order = np.argsort(assigned, kind="stable")
    labels, starts = np.unique(assigned[order], return_index=True)
    for label, members in zip(labels, np.split(order, starts[1:]), strict=True):
        if len(members) < 2:
            continue
        rows, parents, sims = cluster_duplicates(x[members], max_similarity, block)
        dropped.append(uids[members[rows]])
        kept.append(uids[members[parents]])
        cosine.append(sims)
        cluster.append(np.full(len(rows), label))
    if not dropped:
        return pl.DataFrame(schema=DECISION_SCHEMA)
    return decisions_frame(np.concatenate(dropped), np.concatenate(kept), np.concatenate(cosine),
                           np.concatenate(cluster), max_similarity)


def semantic_duplicates(uids: np.ndarray, embeddings: np.ndarray, clusters: int, max_similarity: float,
                        seed: int = 0) -> pl.DataFrame:
    """One decision row (DECISION_SCHEMA) per semantic duplicate among `uids`, every row in
    memory and in the k-means sample."""
    order = np.argsort(uids, kind="stable")
    uids = np.asarray(uids)[order]
    x = unit_rows(embeddings[order])
    if len(uids) < 2:
        return pl.DataFrame(schema=DECISION_SCHEMA)
    centroids, _ = train_centroids(x, clusters, seed)
    return cluster_decisions(uids, x, assign(x, centroids), max_similarity)
