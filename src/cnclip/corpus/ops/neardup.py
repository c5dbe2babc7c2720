"""Pairs of 64-bit hashes within Hamming distance d, and the groups they link, as relational steps.

Pigeonhole: cut the 64 bits into blocks. Two hashes that differ in at most d bits differ in at
most d blocks, so they agree exactly on every band (a set of blocks) that avoids those d blocks.
A band plan is a list of bands such that every set of d blocks is avoided by at least one band;
then every pair within d shares the band key of some band, and recall is 100% by construction
(the tests check that property exhaustively for the plans chosen).

The relational form, which the code here runs band by band so that peak memory is one band of
keys (band_buckets.py: the group by band key as a two-level counting sort, the candidates checked
inside each small bucket), and which a Spark SQL / DataFrame engine runs over all bands at once:

    hashes     = rows GROUP BY phash SELECT phash, min(uid) AS id    -- equal hashes: one value
    keys       = hashes EXPLODE(band) SELECT id, phash, band, band_key(phash, band) AS key
    candidates = keys JOIN keys USING (band, key) WHERE a.id < b.id        -- group by band key
    pairs      = candidates WHERE bit_count(a.phash XOR b.phash) <= d SELECT DISTINCT a.id, b.id
    labels     = connected components of pairs, by label propagation that hooks labels:
                   label(v) := v; repeat
                   for pairs whose labels differ:                   -- two joins with labels
                     label(max label) := min(its label, min label)  -- group by the larger label
                   label(v) := label(label(v)) until unchanged      -- self-join shortcut
                 until every pair's two labels agree (a few dozen rounds on a 100k-long chain)
    kept       = rows JOIN hashes USING (phash) LEFT JOIN labels USING (id): a row whose uid is
                 not its label (or, off every pair, not its value's id) is a duplicate of it

Eval overlap is the same band join between two tables (training rows and evaluation images).
neardup_frames.py writes these steps as DataFrame operations only; tests check both agree.

Plans: m equal blocks with every choice of m - d of them as a band (`combination_plan`, C(m, d)
bands) is the textbook split; m = d + 1 keys each band on one block, only 13 bits for d = 4,
so 10M uniform hashes would give ~1,200 rows per key and ~3e10 candidates. More blocks key on
more bits at the price of more bands; `covering_plan` finds, greedily, far fewer bands of a given
width than C(m, d) (d = 4: 21 bands of ~26 bits instead of 35 of ~27). `band_plan` picks the plan
with the lowest estimated cost for the input size.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from itertools import combinations
from math import comb
from typing import TYPE_CHECKING

import numpy as np
import polars as pl

if TYPE_CHECKING:  # numba's import (~60 MiB, most of a second) only where the arrays are searched
    from cnclip.corpus.ops.band_buckets import BandBuckets

BITS = 64  # a pHash's width
# Relative costs per hash bucketed and per candidate verified, one band (band_buckets.py, measured
# at 1M and 10M uniform hashes, d = 4: ~12 ns per row, ~1 ns per candidate, read in cache).
_SORT_COST = 1.0
_CANDIDATE_COST = 0.08
# Greedy coverings are searched where the exhaustive check stays small (milliseconds).
_COVERING_MAX_POINTS = 12
_COVERING_MAX_SUBSETS = 5_000


def block_masks(blocks: int) -> list[int]:
    """`blocks` contiguous bit masks covering the 64 bits, as equal in width as possible."""
    widths = [BITS // blocks + (1 if i < BITS % blocks else 0) for i in range(blocks)]
    masks, shift = [], BITS
    for width in widths:
        shift -= width
        masks.append(((1 << width) - 1) << shift)
    return masks


def choose_blocks(count: int, max_distance: int) -> int:
    """The number of blocks of the textbook split with the lowest estimated cost for `count` hashes."""
    if max_distance == 0:
        return 1
    best, best_cost = max_distance + 1, float("inf")
    for blocks in range(max_distance + 1, min(BITS, max_distance + 8) + 1):
        tables = comb(blocks, blocks - max_distance)
        key_bits = BITS * (blocks - max_distance) / blocks
        candidates = count * count / 2 * 2.0 ** (-key_bits)
        cost = tables * (count * _SORT_COST + candidates * _CANDIDATE_COST)
        if cost < best_cost:
            best, best_cost = blocks, cost
    return best


@dataclass(frozen=True)
class BandPlan:
    """Blocks (bit masks) and bands (tuples of block indices): each band's key is its blocks' bits."""

    masks: tuple[int, ...]
    bands: tuple[tuple[int, ...], ...]

    def key_bits(self, band: tuple[int, ...]) -> int:
        return sum(bin(self.masks[i]).count("1") for i in band)

    def cost(self, count: int, pairs: float) -> float:
        """Rows keyed and sorted per band, plus the candidates expected among `pairs` uniform pairs."""
        return sum(count * _SORT_COST + pairs * 2.0 ** -self.key_bits(band) * _CANDIDATE_COST
                   for band in self.bands)


def combination_plan(blocks: int, max_distance: int) -> BandPlan:
    """Every choice of `blocks - max_distance` of `blocks` equal blocks: the textbook split."""
    return BandPlan(tuple(block_masks(blocks)), tuple(combinations(range(blocks), blocks - max_distance)))


@lru_cache(maxsize=64)
def covering_plan(points: int, key_blocks: int, max_distance: int) -> BandPlan:
    """Bands of `key_blocks` of `points` blocks, chosen greedily (the band avoiding the most
    still-unavoided sets of d blocks first) until every set of d blocks is avoided by one."""
    if key_blocks + max_distance >= points:
        return combination_plan(points, max_distance)
    candidates = list(combinations(range(points), key_blocks))
    as_bits = np.array([sum(1 << i for i in band) for band in candidates], dtype=np.int64)
    subsets = np.array([sum(1 << i for i in s) for s in combinations(range(points), max_distance)], dtype=np.int64)
    avoids = (as_bits[:, None] & subsets[None, :]) == 0
    open_ = np.ones(len(subsets), dtype=bool)
    bands = []
    while open_.any():
        best = int(np.argmax(avoids[:, open_].sum(axis=1)))  # first of the best: deterministic
        bands.append(candidates[best])
        open_ &= ~avoids[best]
    return BandPlan(tuple(block_masks(points)), tuple(bands))


def band_plan(count: int, max_distance: int, others: int | None = None) -> BandPlan:
    """The cheapest complete plan for `count` uniform hashes, searched among them against each
    other or, with `others`, against that many other hashes (a join between two tables)."""
    pairs = count * count / 2 if others is None else count * others
    plans = [combination_plan(choose_blocks(count, max_distance), max_distance)]
    for points in range(max_distance + 1, _COVERING_MAX_POINTS + 1):
        if comb(points, max_distance) <= _COVERING_MAX_SUBSETS:
            plans += [covering_plan(points, k, max_distance) for k in range(1, points - max_distance + 1)]
    return min(plans, key=lambda plan: (plan.cost(count, pairs), len(plan.bands)))


def _compact_keys(hashes: np.ndarray, masks: list[int], chosen: tuple[int, ...]) -> tuple[np.ndarray, int]:
    """The chosen blocks' bits packed next to each other (low bits), and their total width."""
    keys = np.zeros(len(hashes), dtype=np.uint64)
    width = 0
    for i in chosen:
        mask = masks[i]
        shift = (mask & -mask).bit_length() - 1
        bits = mask.bit_length() - shift
        keys |= ((hashes >> np.uint64(shift)) & np.uint64((1 << bits) - 1)) << np.uint64(width)
        width += bits
    return keys, width


def near_pairs(hashes: np.ndarray, max_distance: int, blocks: int | None = None, reuse: BandBuckets | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs (a < b) of `hashes` (distinct uint64 values) within `max_distance` bits.
    `blocks` forces the textbook split into that many blocks; by default the cheapest plan.
    Each band's pairs leave out those sharing an earlier band's key, so each pair comes once;
    `reuse` lends its buffers (see BandBuckets)."""
    hashes = np.ascontiguousarray(hashes, dtype=np.uint64)
    count = len(hashes)
    if count < 2 or max_distance <= 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty
    from cnclip.corpus.ops.band_buckets import BandBuckets

    plan = combination_plan(blocks, max_distance) if blocks else band_plan(count, max_distance)
    buckets = BandBuckets(hashes, reuse)
    band_masks = [sum(plan.masks[i] for i in band) for band in plan.bands]
    found: list[np.ndarray] = []
    for number, mask in enumerate(band_masks):
        a, b = buckets.pairs(mask, max_distance, tuple(band_masks[:number]))
        found.append(a * count + b)  # one int64 per pair (a < b): sorted, the pairs in (a, b) order
    pairs = np.sort(np.concatenate(found))
    return pairs // count, pairs % count


def cross_pairs(left: np.ndarray, right: np.ndarray, max_distance: int) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs (i into `left`, j into `right`) within `max_distance` bits: the band join of
    two tables. Both may hold repeated values; every matching pair is returned once."""
    left = np.ascontiguousarray(left, dtype=np.uint64)
    right = np.ascontiguousarray(right, dtype=np.uint64)
    if len(left) == 0 or len(right) == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty
    plan = band_plan(len(left), max_distance, others=len(right))
    found = []
    for band in plan.bands:
        key_left, _ = _compact_keys(left, list(plan.masks), band)
        key_right, _ = _compact_keys(right, list(plan.masks), band)
        joined = (pl.DataFrame({"key": key_left, "i": np.arange(len(left))})
                  .join(pl.DataFrame({"key": key_right, "j": np.arange(len(right))}), on="key"))
        i, j = joined["i"].to_numpy(), joined["j"].to_numpy()
        close = np.bitwise_count(left[i] ^ right[j]) <= max_distance
        found.append(i[close] * len(right) + j[close])
    unique = np.unique(np.concatenate(found))
    return unique // len(right), unique % len(right)


def equal_pairs(hashes: np.ndarray, buckets: BandBuckets | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(row, first row with the same value) for every row whose value appeared at a lower index:
    the group-by on the whole hash, as the band search's buckets keyed on all 64 bits (those of
    `buckets`, built over these hashes, if given)."""
    hashes = np.ascontiguousarray(hashes, dtype=np.uint64)
    if len(hashes) < 2:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty
    if buckets is None:
        from cnclip.corpus.ops.band_buckets import BandBuckets

        buckets = BandBuckets(hashes)
    return buckets.equals()


def component_labels(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(nodes, label of each): the nodes on the edges (a, b), sorted, each labelled with the
    smallest node of its connected component.

    Label propagation that hooks labels, not nodes: for every edge whose ends carry different
    labels, the larger label itself takes the smaller (so a whole tree moves at once), then every
    node takes its label's label until nothing changes. Moving nodes one hop per round instead
    needs ~26,000 rounds for a 100,000-long chain in random order; this needs a few dozen.
    """
    nodes = np.unique(np.concatenate([a, b]))
    if len(nodes) == 0:
        return nodes, nodes
    u, v = np.searchsorted(nodes, a), np.searchsorted(nodes, b)
    label = np.arange(len(nodes))  # node positions: the smallest position is the smallest node
    while True:
        lu, lv = label[u], label[v]
        apart = lu != lv
        if not apart.any():
            return nodes, nodes[label]
        np.minimum.at(label, np.maximum(lu[apart], lv[apart]), np.minimum(lu[apart], lv[apart]))
        while True:  # shortcut until every label is its own label
            jumped = label[label]
            if np.array_equal(jumped, label):
                break
            label = jumped


def group_representatives(count: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """For nodes 0..count-1 joined by edges (a, b): the smallest node of each one's group.

    Groups are the connected components, so the result does not depend on edge order: a chain
    x ~ y ~ z is one group even when x and z are further apart than the threshold.
    """
    representatives = np.arange(count)
    nodes, labels = component_labels(np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64))
    representatives[nodes] = labels
    return representatives
