"""The band search behind near dedup and eval overlap: plans that can miss no pair, the steps
(equal keys, equal hashes, components) at their edges, and results equal to a brute-force
reference on inputs built to hurt: chains, long runs of one key, many copies of one hash."""

from itertools import combinations

import numpy as np
import polars as pl
import pytest
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from cnclip.corpus.ops import band_buckets
from cnclip.corpus.ops.dedup import eval_overlaps, near_duplicates
from cnclip.corpus.ops.neardup import (
    BandPlan,
    band_plan,
    block_masks,
    component_labels,
    covering_plan,
    cross_pairs,
    equal_pairs,
    near_pairs,
)
from cnclip.corpus.ops.neardup_frames import components_frame, cross_pairs_frame, near_duplicates_frame
from conftest import flip


def avoided_by_some_band(plan: BandPlan, d: int) -> bool:
    """Exhaustive pigeonhole check: for every choice of d blocks holding the flipped bits, some
    band keys on none of them, so that band's key is equal for the pair."""
    blocks = range(len(plan.masks))
    return all(any(not set(band) & set(flipped) for band in plan.bands)
               for flipped in combinations(blocks, min(d, len(plan.masks))))


@pytest.mark.parametrize("d", range(0, 9))
def test_every_chosen_plan_misses_no_pair(d):
    for count in (2, 1_000, 10**6, 10**7, 10**8):
        for others in (None, 10, 10**5):
            plan = band_plan(count, d, others)
            assert sum(plan.masks) == 2**64 - 1
            assert avoided_by_some_band(plan, d), (count, d, others, plan.bands)


def test_covering_plans_are_complete_and_smaller_than_every_combination():
    for points, key_blocks, d in ((10, 4, 4), (9, 3, 4), (8, 3, 3), (12, 5, 4), (7, 2, 2)):
        plan = covering_plan(points, key_blocks, d)
        assert avoided_by_some_band(plan, d)
        assert all(len(band) == key_blocks for band in plan.bands)
        assert len(plan.bands) < len(list(combinations(range(points), key_blocks)))
    # With candidates checked in cache (~1 ns against ~12 ns per row and band), shorter keys pay:
    # the 10M-row default is the 12-band covering of 9 blocks (21-bit keys), the 1M-row one the
    # 9-band covering of 7 (18-bit keys), not the 35 bands of the textbook split of 7.
    assert len(band_plan(10**7, 4).bands) == 12 and len(band_plan(10**7, 4).masks) == 9
    assert len(band_plan(10**6, 4).bands) == 9 and len(band_plan(10**6, 4).masks) == 7


def test_a_plan_that_misses_a_set_is_caught_by_the_check():
    plan = covering_plan(10, 4, 4)
    assert not avoided_by_some_band(BandPlan(plan.masks, plan.bands[:-1]), 4)


def pairs_brute(hashes, d):
    distances = np.bitwise_count(hashes[:, None] ^ hashes[None, :])
    a, b = np.nonzero(np.triu(distances <= d, k=1))
    return set(zip(a.tolist(), b.tolist(), strict=True))


def test_near_pairs_with_every_bit_flipped_somewhere():
    # Each base hash gets copies with d flips spread over every block boundary.
    rng = np.random.default_rng(3)
    base = np.unique(rng.integers(0, 2**64 - 1, 200, dtype=np.uint64, endpoint=True))
    copies = [flip(h, [(i * 13 + k * 16) % 64 for k in range(4)]) for i, h in enumerate(base)]
    hashes = np.unique(np.concatenate([base, np.array(copies, dtype=np.uint64)]))
    a, b = near_pairs(hashes, 4)
    assert set(zip(a.tolist(), b.tolist(), strict=True)) == pairs_brute(hashes, 4)
    assert len(a) >= len(base)


@pytest.mark.parametrize("d, blocks", [(4, None), (2, None), (1, 9)])
def test_a_pair_many_bands_share_is_returned_once_in_pair_order(d, blocks):
    # One flipped bit leaves every band but those on its block equal: most bands see the pair.
    rng = np.random.default_rng(d)
    base = np.unique(rng.integers(0, 2**64 - 1, 400, dtype=np.uint64, endpoint=True))
    copies = [flip(h, [int(rng.integers(64))]) for h in base[:150]]
    hashes = np.unique(np.concatenate([base, np.array(copies, dtype=np.uint64)]))
    a, b = near_pairs(hashes, d, blocks)
    pairs = list(zip(a.tolist(), b.tolist(), strict=True))
    assert pairs == sorted(pairs_brute(hashes, d)) and len(pairs) >= 150


def test_long_runs_of_one_key_across_many_small_buckets(monkeypatch):
    # 4 rows per level-one bucket: the cluster (120 values equal on the top 40 bits) is one long
    # run of one key in every band keyed on those bits, so one bucket holds 30 times its share.
    monkeypatch.setattr(band_buckets, "_BUCKET_ROWS", 4)
    hashes = np.unique(hostile_hashes(2))
    for d in (3, 6):
        a, b = near_pairs(hashes, d)
        assert list(zip(a.tolist(), b.tolist(), strict=True)) == sorted(pairs_brute(hashes, d))
    later, first = equal_pairs(np.array([9, 1, 9, 3, 1, 9, 7], dtype=np.uint64))
    assert sorted(zip(later.tolist(), first.tolist(), strict=True)) == [(2, 0), (4, 1), (5, 0)]


def test_equal_pairs_point_at_the_first_row_and_ignore_equal_high_bits():
    # 3 and 7 share every bit above the 3 index bits with 1 but are different values.
    hashes = np.array([9, 1, 9, 3, 1, 9, 7], dtype=np.uint64)
    later, first = equal_pairs(hashes)
    assert sorted(zip(later.tolist(), first.tolist(), strict=True)) == [(2, 0), (4, 1), (5, 0)]
    assert [x.tolist() for x in equal_pairs(np.array([4], dtype=np.uint64))] == [[], []]


def test_component_labels_of_a_long_shuffled_chain_and_separate_groups():
    rng = np.random.default_rng(0)
    nodes = rng.permutation(np.arange(10, 3010)).astype(np.int64)  # a chain in a random node order
    a, b = nodes[:-1], nodes[1:]
    order = rng.permutation(len(a))
    a = np.concatenate([a[order], [1, 5000]])
    b = np.concatenate([b[order], [2, 7000]])
    found, labels = component_labels(a, b)
    assert found.tolist() == [1, 2, *range(10, 3010), 5000, 7000]
    assert labels.tolist() == [1, 1, *[10] * 3000, 5000, 5000]
    empty = component_labels(np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64))
    assert [x.tolist() for x in empty] == [[], []]


def reference_near(uids, hashes, d):
    """Brute force: all pairs of rows within d (equal hashes included), components, first row kept."""
    distances = np.bitwise_count(hashes[:, None] ^ hashes[None, :])
    a, b = np.nonzero(np.triu(distances <= d, k=1))
    graph = coo_matrix((np.ones(len(a)), (a, b)), shape=(len(uids), len(uids)))
    _, labels = connected_components(graph, directed=False)
    first = {}
    for row, label in enumerate(labels):
        first.setdefault(label, row)
    return [(int(uids[r]), int(uids[first[labels[r]]]), int(distances[r, first[labels[r]]]))
            for r in range(len(uids)) if first[labels[r]] != r]


def hostile_hashes(seed):
    """Random hashes, chains of 3-bit steps, 150 copies of one placeholder hash, and a cluster of
    values equal on the top 40 bits (one long run of one band key)."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 2**64 - 1, 700, dtype=np.uint64, endpoint=True)
    chain = [base[0]]
    for step in range(30):
        chain.append(flip(chain[-1], [(step * 7 + k) % 64 for k in range(3)]))
    placeholder = np.full(150, base[1], dtype=np.uint64)
    cluster = (base[2] & np.uint64(~((1 << 24) - 1) & (2**64 - 1))) | rng.integers(0, 1 << 24, 120).astype(np.uint64)
    hashes = np.concatenate([base, np.array(chain, dtype=np.uint64), placeholder, cluster])
    return hashes[rng.permutation(len(hashes))]


@pytest.mark.parametrize("d", [0, 1, 3, 4, 6])
@pytest.mark.parametrize("seed", [0, 1])
def test_near_duplicates_equal_the_brute_force_reference(d, seed):
    hashes = hostile_hashes(seed)
    uids = np.arange(len(hashes), dtype=np.int64) * 2 + 100
    found = near_duplicates(uids, hashes, d)
    expected = reference_near(uids, hashes, d)
    assert found.select("uid", "duplicate_of_uid").rows() == [(u, k) for u, k, _ in expected]
    assert found["detail"].to_list() == [f"pHash distance {x} to the kept image" for _, _, x in expected]
    assert len(expected) >= 149  # the placeholder copies at least


@pytest.mark.parametrize("d", [0, 2, 4])
def test_cross_pairs_and_eval_overlap_equal_brute_force(d):
    rng = np.random.default_rng(d + 10)
    train = hostile_hashes(d)
    picks = rng.choice(len(train), 40, replace=False)
    evals = np.array([flip(train[i], rng.choice(64, rng.integers(0, d + 3), replace=False)) for i in picks]
                     + [train[picks[0]]], dtype=np.uint64)  # the last one repeats a value: first index wins
    i, j = cross_pairs(train, evals, d)
    distances = np.bitwise_count(train[:, None] ^ evals[None, :])
    assert set(zip(i.tolist(), j.tolist(), strict=True)) == set(zip(*[x.tolist() for x in np.nonzero(distances <= d)], strict=True))
    ids = [f"e{k}" for k in range(len(evals))]
    found = eval_overlaps(np.arange(len(train)), train, ids, evals, d)
    close = distances <= d
    rows = np.flatnonzero(close.any(axis=1))
    first = close[rows].argmax(axis=1)
    assert found.select("uid", "duplicate_of_eval", "detail").rows() == [
        (int(r), ids[f], f"pHash distance {distances[r, f]}") for r, f in zip(rows, first, strict=True)]
    assert found.height >= 1


def test_blocks_of_a_plan_tile_the_hash():
    plan = band_plan(10**7, 4)  # the 12-band covering of 9 blocks (see the plan choice above)
    assert list(plan.masks) == block_masks(9)
    keyed = {plan.key_bits(band) for band in plan.bands}
    assert min(keyed) >= 21 and max(keyed) <= 22
    assert {i for band in plan.bands for i in band} == set(range(9))


# --- the relational form (what a distributed engine runs) gives the same answers ----------------

@pytest.mark.parametrize("d", [0, 3, 4])
def test_relational_form_keeps_the_same_rows(d):
    hashes = hostile_hashes(d)
    uids = np.arange(len(hashes), dtype=np.int64) * 3 + 1
    rows = pl.LazyFrame({"uid": uids, "phash": hashes}, schema={"uid": pl.Int64, "phash": pl.UInt64})
    found = near_duplicates_frame(rows, band_plan(len(hashes), d), d)
    assert found.rows() == near_duplicates(uids, hashes, d).select("uid", "duplicate_of_uid").rows()
    assert found.height >= 149


def id_frame(values):
    return pl.LazyFrame({"id": np.arange(len(values)), "phash": values}, schema={"id": pl.Int64, "phash": pl.UInt64})


def test_relational_components_and_cross_pairs_match_the_array_form():
    rng = np.random.default_rng(4)
    a, b = rng.integers(0, 400, 300), rng.integers(0, 400, 300)
    labels = components_frame(pl.DataFrame({"a": a, "b": b}))
    nodes, expected = component_labels(a, b)
    assert labels["id"].to_list() == nodes.tolist() and labels["label"].to_list() == expected.tolist()
    train = hostile_hashes(5)
    evals = np.array([flip(h, [1, 30, 60]) for h in train[:50]], dtype=np.uint64)
    pairs = cross_pairs_frame(id_frame(train), id_frame(evals), band_plan(len(train), 3, len(evals)), 3).collect()
    i, j = cross_pairs(train, evals, 3)
    assert set(pairs.iter_rows()) == set(zip(i.tolist(), j.tolist(), strict=True)) and len(i) >= 50
