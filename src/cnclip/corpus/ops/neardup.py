"""Pairs of 64-bit hashes within Hamming distance d, and the groups they link, as relational steps.

Pigeonhole: cut the 64 bits into blocks. Two hashes that differ in at most d bits differ in at
most d blocks, so they agree exactly on every band (a set of blocks) that avoids those d blocks.
A band plan is a list of bands such that every set of d blocks is avoided by at least one band;
then every pair within d shares the band key of some band, and recall is 100% by construction
(the tests check that property exhaustively for the plans chosen).

The relational form, which the numpy code here runs band by band so that peak memory is one band
of keys, and which a Spark SQL / DataFrame engine runs over all bands at once:

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

import numpy as np
import polars as pl

BITS = 64
# Relative costs per hash sorted and per candidate verified (measured: 10M hashes, d = 4, numpy 2.4).
_SORT_COST = 1.0
_CANDIDATE_COST = 1.5
# Greedy coverings are searched where the exhaustive check stays small (milliseconds).
_COVERING_MAX_POINTS = 12
_COVERING_MAX_SUBSETS = 5_000
_CHUNK = 1 << 16  # words per pass of the element-wise steps: the chunk and its temporaries stay in cache
_CHUNK_OFFSETS = 3  # offsets walked inside a chunk (still in cache); the few longer runs go on after


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


def _ramp(lengths: np.ndarray) -> np.ndarray:
    """[0..l0-1, 0..l1-1, ...] for the given lengths, vectorized."""
    lengths = lengths[lengths > 0]
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    offsets = np.repeat(np.cumsum(lengths) - lengths, lengths)
    return np.arange(total, dtype=np.int64) - offsets


def _pairs_in_runs(order: np.ndarray, keys_sorted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """All index pairs (i < j positions) among equal adjacent keys of a sorted array."""
    n = len(keys_sorted)
    if n < 2:
        empty = np.zeros(0, dtype=order.dtype)
        return empty, empty
    change = np.flatnonzero(keys_sorted[1:] != keys_sorted[:-1]) + 1
    starts = np.concatenate(([0], change))
    lengths = np.diff(np.concatenate((starts, [n])))
    keep = lengths > 1
    starts, lengths = starts[keep], lengths[keep]
    if len(starts) == 0:
        empty = np.zeros(0, dtype=order.dtype)
        return empty, empty
    # Every position p in a run of length L starting at s pairs with the L - 1 - (p - s) after it.
    positions = np.repeat(starts, lengths) + _ramp(lengths)
    after = np.repeat(starts + lengths, lengths) - positions - 1
    first = np.repeat(positions, after)
    second = first + 1 + _ramp(after)
    return order[first], order[second]


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


def _segments(masks: tuple[int, ...] | list[int], band: tuple[int, ...]) -> list[tuple[int, int]]:
    """The band's blocks as (low bit, width) runs, adjacent blocks merged: fewer shifts per key."""
    runs: list[list[int]] = []
    for i in sorted(band):
        low = (masks[i] & -masks[i]).bit_length() - 1
        width = masks[i].bit_length() - low
        if runs and runs[-1][0] == low + width:  # block i sits just below the previous run
            runs[-1] = [low, runs[-1][1] + width]
        else:
            runs.append([low, width])
    return [(low, width) for low, width in runs]


def _rest_runs(masks: tuple[int, ...] | list[int], band: tuple[int, ...], width: int) -> list[tuple[int, int]]:
    """Up to `width` bits outside the band, as (low bit, width) runs, the widest runs first: the
    spare bits of a packed word, which reject most candidates before their hashes are fetched."""
    inside = sum(masks[i] for i in band)
    runs, bit = [], 0
    while bit < BITS:
        if inside >> bit & 1:
            bit += 1
            continue
        start = bit
        while bit < BITS and not inside >> bit & 1:
            bit += 1
        runs.append((start, bit - start))
    chosen = []
    for low, run in sorted(runs, key=lambda r: (-r[1], r[0])):
        take = min(run, width - sum(w for _, w in chosen))
        if take > 0:
            chosen.append((low, take))
    return chosen


def _packed_band_keys(hashes: np.ndarray, plan: BandPlan, band: tuple[int, ...], index_bits: int,
                      spare_bits: int = 0) -> np.ndarray:
    """key << (spare_bits + index_bits) | spare << index_bits | index in one uint64 per hash, where
    spare holds `spare_bits` hash bits outside the key; built in place chunk by chunk, the index
    counted up per chunk (the temporaries stay in cache, and no index array is read)."""
    placed, offset = [], index_bits
    for low, width in _rest_runs(plan.masks, band, spare_bits) + _segments(plan.masks, band):
        placed.append((low, offset, np.uint64(((1 << width) - 1) << offset)))
        offset += width
    return _chunked_words(hashes, placed)


def _chunked_words(hashes: np.ndarray, placed: list[tuple[int, int, np.uint64]]) -> np.ndarray:
    """index | OR of (hash bits moved from `low` to `offset`, masked) per (low, offset, mask)."""
    out = np.empty(len(hashes), dtype=np.uint64)
    ramp = np.arange(min(_CHUNK, len(hashes)), dtype=np.uint64)
    scratch = np.empty(len(ramp), dtype=np.uint64)
    for start in range(0, len(hashes), _CHUNK):
        part, acc = hashes[start:start + _CHUNK], out[start:start + _CHUNK]
        tmp = scratch[: len(part)]
        np.add(ramp[: len(part)], np.uint64(start), out=acc)
        for low, offset, mask in placed:
            if offset == low:
                np.bitwise_and(part, mask, out=tmp)
            else:
                (np.left_shift if offset > low else np.right_shift)(part, np.uint64(abs(offset - low)), out=tmp)
                np.bitwise_and(tmp, mask, out=tmp)
            np.bitwise_or(acc, tmp, out=acc)
    return out


def _sorted_by_key(keys: np.ndarray, key_bits: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    """(order, sorted keys). Packs key and index into one uint64 when they fit: polars' sort of a
    uint64 column is ~5x faster than numpy's argsort and ~3x faster than numpy's sort here."""
    index_bits = max(1, (count - 1).bit_length())
    if key_bits + index_bits <= 64:
        packed = _sort_u64((keys << np.uint64(index_bits)) | np.arange(count, dtype=np.uint64))
        order = (packed & np.uint64((1 << index_bits) - 1)).astype(np.int64)
        return order, packed >> np.uint64(index_bits)
    order = np.argsort(keys)
    return order, keys[order]


def _sort_u64(values: np.ndarray) -> np.ndarray:
    """On one thread: on 2 shared cores polars' threaded sort of 10M words took 0.30 s, one thread 0.19 s."""
    return pl.Series(values, dtype=pl.UInt64).sort(multithreaded=False).to_numpy()


def _band_pairs(hashes: np.ndarray, plan: BandPlan, band: tuple[int, ...], index_bits: int,
                max_distance: int, earlier: tuple[int, ...] = ()) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs (a < b) sharing the band's key and within `max_distance`, but none sharing the
    key of an earlier band (bit masks `earlier`), so each pair comes from one band: sort (key,
    index), walk equal neighbours, verify by popcount."""
    if plan.key_bits(band) + index_bits > 64:
        keys, width = _compact_keys(hashes, list(plan.masks), band)
        a, b = _pairs_in_runs(*_sorted_by_key(keys, width, len(hashes)))
        a, b = np.minimum(a, b), np.maximum(a, b)  # an argsort leaves a run in any index order
        keep = _new_and_close(hashes[a] ^ hashes[b], max_distance, earlier)
        return a[keep], b[keep]
    spare_bits = BITS - plan.key_bits(band) - index_bits
    packed = _sort_u64(_packed_band_keys(hashes, plan, band, index_bits, spare_bits))
    return _equal_key_pairs(packed, index_bits, hashes, max_distance, spare_bits, earlier)


def _new_and_close(xor: np.ndarray, max_distance: int, earlier: tuple[int, ...]) -> np.ndarray:
    """Pairs (hash XORs) within `max_distance` whose hashes differ under every earlier band's mask:
    a pair equal under an earlier band was found there (its walk sees every equal-key pair)."""
    keep = np.bitwise_count(xor) <= max_distance
    for mask in earlier:
        keep &= (xor & np.uint64(mask)) != 0
    return keep


def _equal_key_pairs(packed: np.ndarray, index_bits: int, hashes: np.ndarray | None = None,
                     max_distance: int = BITS, spare_bits: int = 0, earlier: tuple[int, ...] = ()
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs with equal keys in sorted (key, spare, index) words (with `hashes`, only those
    within `max_distance`), walking offsets 1, 2, ...: the rows still equal at offset k are a subset
    of those equal at k - 1, so the work is the number of pairs, not the square of the longest run,
    and each offset's candidates are verified before the next, so memory holds found pairs only.

    The first offsets are walked chunk by chunk, while the chunk's words are in cache; a pair whose
    spare bits alone differ in more than `max_distance` bits is dropped from the XOR that compares
    the keys, before any hash is fetched (random reads, the costly part once the table outgrows
    the cache). With `hashes`, pairs equal under an `earlier` band mask are left out."""
    walk = _Walk(packed, index_bits, hashes, max_distance, spare_bits, earlier)
    rest = [np.zeros(0, dtype=np.int64)]
    for start in range(0, len(packed) - 1, _CHUNK):
        stop = min(start + _CHUNK, len(packed) - 1)
        xor = packed[start + 1:stop + 1] ^ packed[start:stop]
        same = np.flatnonzero(xor <= walk.below_key)
        walk.emit(same + start, xor[same], 1)
        rest.append(walk.follow(same + start, 2, _CHUNK_OFFSETS))
    walk.follow(np.concatenate(rest), _CHUNK_OFFSETS + 1, None)
    return np.concatenate(walk.found_a), np.concatenate(walk.found_b)


class _Walk:
    """The state of one band's walk over equal-key runs: the words, the check, the pairs found."""

    def __init__(self, packed: np.ndarray, index_bits: int, hashes: np.ndarray | None, max_distance: int,
                 spare_bits: int, earlier: tuple[int, ...]) -> None:
        self.packed, self.hashes, self.max_distance, self.earlier = packed, hashes, max_distance, earlier
        self.below_key = np.uint64((1 << (index_bits + spare_bits)) - 1)
        self.index_mask = np.uint64((1 << index_bits) - 1)
        self.spare_shift = np.uint64(index_bits) if spare_bits else None
        self.found_a, self.found_b = [np.zeros(0, dtype=np.int64)], [np.zeros(0, dtype=np.int64)]

    def follow(self, first: np.ndarray, offset: int, last: int | None) -> np.ndarray:
        """Walk offsets from `offset` to `last` (or to the end of the runs) for positions `first`
        equal to the word offset - 1 ahead; the positions still equal after `last`."""
        packed = self.packed
        while len(first) and (last is None or offset <= last):
            first = first[first + offset < len(packed)]
            xor = packed[first] ^ packed[first + offset]
            same = xor <= self.below_key
            first = first[same]
            self.emit(first, xor[same], offset)
            offset += 1
        return first

    def emit(self, first: np.ndarray, xor: np.ndarray, offset: int) -> None:
        """Record the pairs (p, p + offset), p in `first` (equal keys, word XOR `xor`), within the distance."""
        if self.spare_shift is not None:
            first = first[np.bitwise_count(xor >> self.spare_shift) <= self.max_distance]
        a = (self.packed[first] & self.index_mask).astype(np.int64)
        b = (self.packed[first + offset] & self.index_mask).astype(np.int64)
        if self.spare_shift is not None:  # within a run the words are ordered by spare bits, not by index
            a, b = np.minimum(a, b), np.maximum(a, b)
        if self.hashes is not None:
            keep = _new_and_close(self.hashes[a] ^ self.hashes[b], self.max_distance, self.earlier)
            a, b = a[keep], b[keep]
        self.found_a.append(a)
        self.found_b.append(b)


def near_pairs(hashes: np.ndarray, max_distance: int, blocks: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs (a < b) of `hashes` (distinct uint64 values) within `max_distance` bits.
    `blocks` forces the textbook split into that many blocks; by default the cheapest plan."""
    hashes = np.ascontiguousarray(hashes, dtype=np.uint64)
    count = len(hashes)
    if count < 2 or max_distance <= 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty
    plan = combination_plan(blocks, max_distance) if blocks else band_plan(count, max_distance)
    index_bits = max(1, (count - 1).bit_length())
    found: list[np.ndarray] = []
    for number, band in enumerate(plan.bands):
        earlier = tuple(sum(plan.masks[i] for i in other) for other in plan.bands[:number])
        a, b = _band_pairs(hashes, plan, band, index_bits, max_distance, earlier)
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


def equal_pairs(hashes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(row, first row with the same value) for every row whose value appeared at a lower index:
    the group-by on the whole hash, as one packed sort of its high bits plus a check of the rest."""
    hashes = np.ascontiguousarray(hashes, dtype=np.uint64)
    count = len(hashes)
    empty = np.zeros(0, dtype=np.int64)
    if count < 2:
        return empty, empty
    index_bits = max(1, (count - 1).bit_length())
    low = np.uint64((1 << index_bits) - 1)
    high = np.uint64((2**BITS - 1) ^ ((1 << index_bits) - 1))
    packed = _sort_u64(_chunked_words(hashes, [(0, 0, high)]))
    same = _same_as_next(packed, low)
    rows = (packed[np.union1d(same, same + 1)] & low).astype(np.int64)
    if len(rows) == 0:
        return empty, empty
    rows = rows[np.lexsort((rows, hashes[rows]))]  # by value, then index: a value's first row leads
    values = hashes[rows]
    starts = np.concatenate(([True], values[1:] != values[:-1]))
    first = rows[np.flatnonzero(starts)][np.cumsum(starts) - 1]
    later = ~starts
    return rows[later], first[later]


def _same_as_next(packed: np.ndarray, low: np.uint64) -> np.ndarray:
    """Positions whose word equals the next one above the bits `low`, chunk by chunk (in cache)."""
    found = [np.zeros(0, dtype=np.int64)]
    for start in range(0, len(packed) - 1, _CHUNK):
        stop = min(start + _CHUNK, len(packed) - 1)
        found.append(np.flatnonzero((packed[start + 1:stop + 1] ^ packed[start:stop]) <= low) + start)
    return np.concatenate(found)


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
