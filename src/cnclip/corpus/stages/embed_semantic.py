"""Semantic dedup in the embed stage, as engine tasks: the driver never holds the build's
embeddings, only the k-means sample and the centroids.

- Sample (one task per embeddings part): each part's rows the CLIP-score filter kept whose draw
  (ops/semantic_dedup.draw, a hash of uid and seed) is below a cutoff the row count sets, at most
  the sample's size of them, into `work/embed-semantic/sample/`. The driver keeps the rows of the
  `sample` smallest draws (every row when the build has no more), trains seeded k-means on them
  in uid order and writes `centroids.parquet`; the same rows in whichever part: the same sample.
- Assign (one task per embeddings part): each kept row's nearest centroid, with its image
  embedding, into `assigned/`, sorted by cluster, one row group per group of clusters.
- Duplicates (one task per group of clusters, contiguous and balanced by the sample's counts):
  the group's rows from every assigned part (its row groups only), cluster by cluster, a cluster
  larger than a block compared a block at a time, into `decisions/`. The driver then writes the
  filter's decisions and these as the one decisions table, through the engine.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple, Optional

import numpy as np
import polars as pl

from cnclip.corpus.manifests.schemas import (
    DECISION_SCHEMA,
    EMBED_DECISIONS,
    EMBED_SCORES,
    SEMANTIC_ASSIGNED,
    SEMANTIC_CENTROIDS,
    SEMANTIC_DECISIONS,
    SEMANTIC_SAMPLE,
    Table,
)
from cnclip.corpus.ops import semantic_dedup as semdedup
from cnclip.corpus.recipe import Recipe
from cnclip.corpus.recipe.embed import SemanticDedup
from cnclip.corpus.runtime import storage
from cnclip.corpus.runtime.commit import committed_parts, committed_path
from cnclip.corpus.runtime.engine import Engine
from cnclip.corpus.runtime.layout import BuildLayout, at

# Rows a duplicates task is planned to read (its clusters' rows, by the sample's counts): about
# 6 bytes x width each in memory (float16 read, float32 compared), ~800 MB at width 512.
GROUP_ROWS = 250_000
_KEPT = "SELECT COUNT(*) FROM scores s LEFT ANTI JOIN filtered f ON s.uid = f.uid"
_COMBINED = f"""
SELECT {', '.join(DECISION_SCHEMA)} FROM (
  SELECT {', '.join(DECISION_SCHEMA)} FROM filtered UNION ALL SELECT {', '.join(DECISION_SCHEMA)} FROM semantic
) u ORDER BY uid
"""


class SampleTask(NamedTuple):
    """One embeddings part's sample candidates."""

    part: str
    filtered: str  # the CLIP-score filter's decisions: rows semantic dedup does not see
    out: str
    seed: int
    cutoff: Optional[int]  # draws below it are candidates; None: every row
    limit: int


class AssignTask(NamedTuple):
    """One embeddings part's rows, to be given their clusters."""

    part: str
    filtered: str
    centroids: str
    out: str
    firsts: tuple[int, ...]  # each group's first cluster: one row group per group


class GroupTask(NamedTuple):
    """One group of clusters, compared within each cluster."""

    assigned: tuple[str, ...]
    first: int  # clusters first..last, both included
    last: int
    out: str
    max_similarity: float
    block: int


def at_width(table: Table, width: int) -> Table:
    """`table` with each of its array columns at the model's `width`."""
    return replace(table, columns={name: (pl.Array(dtype.inner, width) if isinstance(dtype, pl.Array) else dtype)
                                   for name, dtype in table.columns.items()})


def _kept_rows(part: str, filtered: str) -> pl.DataFrame:
    """(uid, image_embedding) of a part's rows the filter kept, in uid order."""
    frame = storage.scan_parquet(part).select("uid", "image_embedding").collect()
    if frame.is_empty():
        return frame
    low, high = frame["uid"].min(), frame["uid"].max()
    dropped = storage.scan_parquet(filtered).select("uid").filter(pl.col("uid").is_between(low, high)).collect()
    return frame.join(dropped, on="uid", how="anti").sort("uid")


def _unit(frame: pl.DataFrame) -> np.ndarray:
    """The frame's image embeddings as float32 rows of unit length."""
    from cnclip.embed.store import matrix

    return semdedup.unit_rows(matrix(frame, "image_embedding"))


def _width(frame: pl.DataFrame) -> int:
    return frame.schema["image_embedding"].shape[0]


def sample_part(task: SampleTask) -> int:
    """A part's sample candidates: its kept rows of the smallest draws below the cutoff."""
    frame = _kept_rows(task.part, task.filtered)
    frame = frame.with_columns(pl.Series("draw", semdedup.draw(frame["uid"].to_numpy(), task.seed), pl.UInt64))
    if task.cutoff is not None:
        frame = frame.filter(pl.col("draw") < pl.lit(task.cutoff, pl.UInt64))
    frame = frame.sort("draw", "uid").head(task.limit).select("uid", "draw", "image_embedding")
    if frame.height:
        at_width(SEMANTIC_SAMPLE, _width(frame)).write(frame, task.out)
    return frame.height


def assign_part(task: AssignTask) -> int:
    """A part's kept rows with their nearest centroid, sorted by cluster, each group of clusters
    its own row group (a duplicates task reads its group's and skips the rest by their statistics)."""
    import pyarrow.parquet as pq

    frame = _kept_rows(task.part, task.filtered)
    if frame.is_empty():
        return 0
    clusters = semdedup.assign(_unit(frame), _centroids(task.centroids))
    frame = frame.with_columns(pl.Series("cluster", clusters, pl.Int64)).sort("cluster", "uid")
    frame = frame.select("uid", "cluster", "image_embedding")
    at_width(SEMANTIC_ASSIGNED, _width(frame)).validate(frame, task.out)
    cuts = np.searchsorted(frame["cluster"].to_numpy(), np.asarray(task.firsts[1:], np.int64))
    table = frame.to_arrow()
    with committed_path(task.out) as tmp, pq.ParquetWriter(tmp, table.schema) as writer:
        for start, end in zip([0, *cuts], [*cuts, frame.height], strict=True):
            if end > start:
                writer.write_table(table.slice(start, end - start))
    return frame.height


def _centroids(path: str) -> np.ndarray:
    frame = storage.scan_parquet(path).sort("cluster").collect()
    return frame["centroid"].to_numpy().astype(np.float32).reshape(frame.height, -1)


def group_duplicates(task: GroupTask) -> int:
    """The decisions among one group of clusters' rows, read from every assigned part."""
    frame = (storage.scan_parquet(list(task.assigned)).filter(pl.col("cluster").is_between(task.first, task.last))
             .collect().sort("uid"))
    if frame.height < 2:
        found = pl.DataFrame(schema=DECISION_SCHEMA)
    else:
        x = _unit(frame)
        found = semdedup.cluster_decisions(frame["uid"].to_numpy(), x, frame["cluster"].to_numpy(),
                                           task.max_similarity, task.block)
    SEMANTIC_DECISIONS.write(found, task.out)
    return found.height


def _cutoff(rows: int, limit: int) -> Optional[int]:
    """The draw below which a row is a sample candidate: every row (None) when the build has no
    more than the sample; otherwise the fraction of the draws' range that leaves the sample plus
    six standard deviations of the binomial count (falling short of it: one chance in a billion)."""
    if rows <= limit:
        return None
    fraction = (limit + 6 * math.sqrt(limit) + 64) / rows
    return None if fraction >= 1 else int(fraction * 2 ** 64)


def group_firsts(trained_on: np.ndarray, groups: int) -> list[int]:
    """The first cluster of each of `groups` contiguous groups, cut where the sample's running
    count passes each multiple of its total / groups (the sample estimates the clusters' sizes)."""
    running = np.cumsum(trained_on)
    targets = running[-1] * np.arange(1, groups) / groups
    cuts = np.searchsorted(running, targets, side="left") + 1
    return sorted({0, *(int(c) for c in cuts if 0 < c < len(trained_on))})


def _sample_and_train(engine: Engine, layout: BuildLayout, settings: SemanticDedup, parts: list[str],
                      rows: int) -> np.ndarray:
    """The sample's candidates part by part, then k-means on the sample (its rows in uid order)
    -> centroids.parquet; returns each centroid's count of the sample's rows."""
    folder, limit = layout.embed_semantic_dir, settings.sample_rows
    cutoff = _cutoff(rows, limit)
    tasks = [SampleTask(p, str(layout.embed_decisions), _beside(folder, "sample", p), settings.seed, cutoff, limit)
             for p in parts]
    engine.map_parts(sample_part, tasks, "semantic dedup: the k-means sample")
    candidates = committed_parts(at(folder, "sample"), ".parquet")
    sample = storage.scan_parquet(candidates).sort("draw", "uid").head(limit).collect().sort("uid")
    x = _unit(sample)
    centroids, trained_on = semdedup.train_centroids(x, settings.clusters, settings.seed)
    frame = pl.DataFrame({"cluster": np.arange(len(centroids), dtype=np.int64),
                          "centroid": centroids, "trained_on": trained_on})
    at_width(SEMANTIC_CENTROIDS, x.shape[1]).write(frame, at(folder, "centroids.parquet"))
    return trained_on


def _beside(folder: Path | str, kind: str, part: str) -> str:
    """The `kind` file of embeddings part `part` (the same name in folder/kind)."""
    return str(at(folder, kind, part.rpartition("/")[2]))


def _assign(engine: Engine, layout: BuildLayout, parts: list[str], firsts: list[int]) -> tuple[str, ...]:
    """Every part's rows with their clusters; returns the assigned parts."""
    folder = layout.embed_semantic_dir
    centroids = str(at(folder, "centroids.parquet"))
    engine.map_parts(assign_part, [AssignTask(p, str(layout.embed_decisions), centroids, _beside(folder, "assigned", p),
                                              tuple(firsts)) for p in parts], "semantic dedup: clusters")
    return tuple(committed_parts(at(folder, "assigned"), ".parquet"))


def _duplicates(engine: Engine, layout: BuildLayout, settings: SemanticDedup, assigned: tuple[str, ...],
                firsts: list[int], clusters: int) -> list[str]:
    """Each group of clusters' decisions; returns their parts."""
    lasts = [*(f - 1 for f in firsts[1:]), clusters - 1]
    tasks = [GroupTask(assigned, first, last, str(at(layout.embed_semantic_dir, "decisions", f"{i:05d}.parquet")),
                       settings.max_similarity, semdedup.BLOCK_ROWS)
             for i, (first, last) in enumerate(zip(firsts, lasts, strict=True))]
    engine.map_parts(group_duplicates, tasks, "semantic dedup: duplicates within clusters")
    return [task.out for task in tasks]


def add_semantic_duplicates(recipe: Recipe, engine: Engine, layout: BuildLayout) -> None:
    """SemDeDup over the image embeddings of the rows the filter kept, its decisions added to the
    filter's in the decisions table."""
    settings = recipe.dedup.semantic
    storage.remove(layout.embed_semantic_dir)  # every step is redone with the decisions: none is half made
    for name in ("sample", "assigned", "decisions"):
        storage.make_dirs(at(layout.embed_semantic_dir, name))
    filtered = engine.scan([layout.embed_decisions])
    scores = engine.scan(committed_parts(layout.embed_scores_dir, ".parquet"), EMBED_SCORES.columns)
    (rows,), = engine.rows(engine.sql(_KEPT, scores=scores, filtered=filtered))
    if rows < 2:
        return
    parts = [str(p) for p in committed_parts(layout.embed_dir, ".parquet")]
    trained_on = _sample_and_train(engine, layout, settings, parts, rows)
    groups = max(1, min(len(trained_on), max(math.ceil(rows / GROUP_ROWS), engine.processes)))
    firsts = group_firsts(trained_on, groups)
    found = _duplicates(engine, layout, settings, _assign(engine, layout, parts, firsts), firsts, len(trained_on))
    combined = engine.sql(_COMBINED, filtered=filtered, semantic=engine.scan(found, DECISION_SCHEMA))
    engine.write(combined, layout.embed_decisions, EMBED_DECISIONS)
