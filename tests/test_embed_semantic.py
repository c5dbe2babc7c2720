"""Semantic dedup as engine tasks (stages/embed_semantic.py) over embeddings parts written here:
rows around a few well-separated directions, with planted near copies, so which rows are copies
is known. The decisions step runs as the embed stage runs it (`decide`), on the local engine and
on Spark; the blocked comparison is checked against the whole-matrix rule and for its memory."""

import fnmatch
import tracemalloc
from types import SimpleNamespace

import numpy as np
import polars as pl
import pytest

from cnclip.corpus.manifests.schemas import TABLES
from cnclip.corpus.ops.semantic_dedup import _blocked_cluster, _whole_cluster, semantic_duplicates, unit_rows
from cnclip.corpus.recipe.embed import ClipScoreFilter, SemanticDedup
from cnclip.corpus.runtime.engine import LocalEngine
from cnclip.corpus.runtime.layout import BuildLayout
from cnclip.corpus.stages import embed_semantic
from cnclip.corpus.stages.embed import decide
from cnclip.embed import store

WIDTH, TOPICS, PER_PART, PARTS = 32, 6, 200, 3
# (copy, original): uid 1000 + i copies row 7 * i; 1100 copies the copy 1000 (a chain to row 0)
COPIES = [(1000 + i, 7 * i) for i in range(12)] + [(1100, 1000)]
LOW = 14  # the original of copy 1002, dropped by the CLIP-score filter: its copy is kept


def _rows():
    """(uids, unit vectors): PARTS x PER_PART rows around TOPICS directions, then the copies."""
    rng = np.random.default_rng(5)
    centers = unit_rows(rng.normal(size=(TOPICS, WIDTH)))
    n = PARTS * PER_PART
    x = unit_rows(centers[rng.integers(0, TOPICS, n)] + 0.1 * rng.normal(size=(n, WIDTH)))
    vectors = {uid: x[uid] for uid in range(n)}
    for copy, original in COPIES:
        vectors[copy] = unit_rows((vectors[original] + 0.003 * rng.normal(size=WIDTH))[None])[0]
    uids = np.array(sorted(vectors))
    return uids, np.stack([vectors[u] for u in uids])


def _write_parts(root):
    """The embeddings and scores parts, the copies spread over the parts; returns the layout."""
    layout = BuildLayout(root / "out", root / "manifests")
    for folder in (layout.embed_dir, layout.embed_scores_dir):
        folder.mkdir(parents=True)
    uids, x = _rows()
    score = np.where(uids == LOW, 0.1, 0.5).astype(np.float32)
    for part in range(PARTS):
        rows = np.flatnonzero(uids % PARTS == part)
        frame = store.frame_of(uids[rows], x[rows], x[rows]).with_columns(
            pl.Series("clip_score", score[rows], pl.Float32))
        store.write_part(frame, layout.embed_dir / f"{part:05d}.parquet")
        frame.select("uid", "clip_score").write_parquet(layout.embed_scores_dir / f"{part:05d}.parquet")
    return layout


def _recipe(**semantic):
    return SimpleNamespace(filter=SimpleNamespace(clip_score=ClipScoreFilter(min_score=0.2)),
                           dedup=SimpleNamespace(semantic=SemanticDedup(clusters=TOPICS, max_similarity=0.99,
                                                                        **semantic)))


def _decide(root, engine=None, **semantic):
    layout = _write_parts(root)
    counts = decide(_recipe(**semantic), engine or LocalEngine(1), layout)
    return layout, counts, pl.read_parquet(layout.embed_decisions)


def _trained_on(layout):
    return pl.read_parquet(layout.embed_semantic_dir / "centroids.parquet")["trained_on"].sum()


def _expected():
    """Each copy whose original the filter kept, naming the kept row at the end of its chain."""
    original = dict(COPIES)
    root = {copy: original.get(original[copy], original[copy]) for copy in original}
    return {copy: kept for copy, kept in root.items() if kept != LOW}


def test_a_build_larger_than_the_sample_drops_the_planted_copies_and_nothing_else(tmp_path):
    layout, counts, decisions = _decide(tmp_path, sample=64)
    rows = PARTS * PER_PART + len(COPIES)
    assert 0 < _trained_on(layout) <= 64 < rows  # k-means saw the sample only
    semantic = decisions.filter(pl.col("reason") == "dedup:semantic_duplicate").sort("uid")
    assert dict(zip(semantic["uid"].to_list(), semantic["duplicate_of_uid"].to_list(), strict=True)) == _expected()
    assert decisions.filter(pl.col("reason") == "embed:low_clip_score")["uid"].to_list() == [LOW]
    assert counts == {"dedup:semantic_duplicate": len(_expected()), "embed:low_clip_score": 1}
    assert decisions["uid"].to_list() == sorted(decisions["uid"].to_list())
    cosines = [float(d.split()[2]) for d in semantic["detail"].to_list()]  # "image cosine 0.9984 > 0.99 (cluster 3)"
    assert all(0.99 < c < 1 for c in cosines), semantic["detail"].to_list()
    # Every work file of the step has its declared schema (manifests/schemas.py).
    written = sorted(p.relative_to(layout.output_dir).as_posix() for p in layout.embed_semantic_dir.rglob("*.parquet"))
    found = {}
    for relative in written:
        [table] = [t for t in TABLES if t.root == "output_dir" and fnmatch.fnmatch(relative, t.name)]
        embed_semantic.at_width(table, WIDTH).check_file(layout.output_dir / relative)  # the model's width
        found[table.name] = found.get(table.name, 0) + 1
    assert set(found) == {"work/embed-semantic/sample/*.parquet", "work/embed-semantic/centroids.parquet",
                          "work/embed-semantic/assigned/*.parquet", "work/embed-semantic/decisions/*.parquet"}


def test_a_sample_of_every_row_gives_the_in_memory_decisions_exactly(tmp_path):
    layout, _, decisions = _decide(tmp_path)  # the default sample (clusters x 256) exceeds the rows
    uids, x = _rows()
    kept = uids != LOW
    assert _trained_on(layout) == kept.sum()
    reference = semantic_duplicates(uids[kept], x[kept].astype(np.float16), TOPICS, 0.99, 0)
    assert decisions.filter(pl.col("reason") == "dedup:semantic_duplicate").equals(reference)


def test_two_runs_and_any_grouping_give_the_same_decisions(tmp_path, monkeypatch):
    _, _, first = _decide(tmp_path / "a", sample=64)
    _, _, again = _decide(tmp_path / "b", sample=64)
    assert first.equals(again)
    monkeypatch.setattr(embed_semantic, "GROUP_ROWS", 1)  # a group a cluster, where the sample's counts allow
    layout, _, grouped = _decide(tmp_path / "c", sample=64)
    groups = len(list((layout.embed_semantic_dir / "decisions").glob("*.parquet")))
    assert groups >= TOPICS // 2
    assert grouped.equals(first)
    # each assigned part holds its rows once, every cluster's in its own row group
    assigned = pl.read_parquet(layout.embed_semantic_dir / "assigned" / "*.parquet")
    assert assigned.height == PARTS * PER_PART + len(COPIES) - 1
    import pyarrow.parquet as pq

    meta = pq.ParquetFile(layout.embed_semantic_dir / "assigned" / "00000.parquet").metadata
    assert meta.num_row_groups == groups


def test_every_row_of_the_sample_is_drawn_by_uid_whatever_its_part():
    from cnclip.corpus.ops.semantic_dedup import draw

    uids = np.arange(10_000, dtype=np.int64)
    assert np.array_equal(draw(uids, 3)[::7], draw(uids[::7], 3))  # a row's draw is its own
    assert not np.array_equal(draw(uids, 3), draw(uids, 4))
    # the cutoff keeps a little more than the sample, the sample then cut to size
    cutoff = embed_semantic._cutoff(len(uids), 500)
    assert 500 < (draw(uids, 3) < np.uint64(cutoff)).sum() < 800
    assert embed_semantic._cutoff(500, 500) is None


def test_groups_are_contiguous_and_balanced_by_the_sample():
    trained_on = np.array([10, 0, 30, 5, 5, 50])
    assert embed_semantic.group_firsts(trained_on, 1) == [0]
    assert embed_semantic.group_firsts(trained_on, 2) == [0, 5]
    # a group ends at the cluster whose running count reaches the next share (40 >= 100 / 6 and
    # 100 * 2 / 6); a cluster above a share (50) is a group alone
    assert embed_semantic.group_firsts(trained_on, 6) == [0, 3, 5]


def _cluster(rows=5000, copies=300):
    rng = np.random.default_rng(1)
    x = unit_rows(rng.normal(size=(rows - copies, WIDTH)))
    originals = rng.integers(0, len(x), copies)
    x = np.concatenate([x, unit_rows(x[originals] + 0.005 * rng.normal(size=(copies, WIDTH)))])
    return x[rng.permutation(rows)]


def _peak(fn, *args):
    tracemalloc.start()
    try:
        result = fn(*args)
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_a_cluster_larger_than_a_block_is_compared_a_block_at_a_time():
    x = _cluster()
    (rows, kept, cosine), whole = _peak(_whole_cluster, x, 0.95)
    (b_rows, b_kept, b_cosine), blocked = _peak(_blocked_cluster, x, 0.95, 512)
    assert len(rows) >= 290
    assert np.array_equal(rows, b_rows) and np.array_equal(kept, b_kept)
    assert np.allclose(cosine, b_cosine, atol=1e-6)
    assert whole > 5000 * 5000 * 4  # the m x m similarities
    # a block's similarities (512 x 512 float32, 1 MiB) and its masks, plus per-row arrays of the cluster
    assert blocked < 4 * 512 * 512 * 4 + 5000 * 64, blocked


@pytest.mark.spark
def test_the_spark_engine_gives_the_same_decisions(tmp_path, spark):
    from cnclip.corpus.runtime.spark_engine import SparkEngine

    _, _, local = _decide(tmp_path / "local", sample=64)
    _, counts, on_spark = _decide(tmp_path / "spark", SparkEngine(spark), sample=64)
    assert on_spark.sort("uid").equals(local)
    assert counts == {"dedup:semantic_duplicate": len(_expected()), "embed:low_clip_score": 1}


from spark_session import spark  # noqa: E402,F401 (the session fixture)
