"""One band's pairs from sorted packed words: each hash becomes key | spare | index in one
uint64 (the band's bits on top, then hash bits outside the key, then the row index), one sort
brings equal keys together, and a walk over the equal-key runs checks the pairs.

Every step except the sort runs chunk by chunk, so that its temporaries stay in cache: at 10M
rows an array is 80 MB, and a pass that reads it from memory costs as much as the work itself.
The spare bits let most candidates be rejected from the XOR that compares two keys, before their
hashes are read at random (the costliest part of checking a candidate once the table outgrows the
cache). neardup.py chooses the bands and collects their pairs.
"""

from __future__ import annotations

import numpy as np
import polars as pl

BITS = 64
# Words per pass of the element-wise steps: 2 MB stays in cache; smaller chunks cost more calls
# (10M rows: 2^16 words per chunk took 5% longer).
_CHUNK = 1 << 18
_CHUNK_OFFSETS = 3  # offsets walked inside a chunk (still in cache); the few longer runs go on after


def band_segments(masks: tuple[int, ...] | list[int], band: tuple[int, ...]) -> list[tuple[int, int]]:
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


def rest_runs(masks: tuple[int, ...] | list[int], band: tuple[int, ...], width: int) -> list[tuple[int, int]]:
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


def packed_band_keys(hashes: np.ndarray, masks: tuple[int, ...], band: tuple[int, ...], index_bits: int,
                     spare_bits: int = 0, out: np.ndarray | None = None) -> np.ndarray:
    """key << (spare_bits + index_bits) | spare << index_bits | index in one uint64 per hash, where
    spare holds `spare_bits` hash bits outside the key; built in place chunk by chunk, the index
    counted up per chunk (the temporaries stay in cache, and no index array is read); into `out`
    if given."""
    placed, offset = [], index_bits
    for low, width in rest_runs(masks, band, spare_bits) + band_segments(masks, band):
        placed.append((low, offset, np.uint64(((1 << width) - 1) << offset)))
        offset += width
    return chunked_words(hashes, placed, out)


def chunked_words(hashes: np.ndarray, placed: list[tuple[int, int, np.uint64]], out: np.ndarray | None = None
                  ) -> np.ndarray:
    """index | OR of (hash bits moved from `low` to `offset`, masked) per (low, offset, mask), into
    `out` if given: one buffer for every band, since an array past glibc's 32 MiB mmap threshold
    comes back from the kernel as fresh pages to fault in and zero on every allocation."""
    out = np.empty(len(hashes), dtype=np.uint64) if out is None else out
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


def sort_u64(values: np.ndarray) -> np.ndarray:
    """On one thread: on 2 shared cores polars' threaded sort of 10M words took 0.30 s, one thread 0.19 s."""
    return pl.Series(values, dtype=pl.UInt64).sort(multithreaded=False).to_numpy()


def new_and_close(xor: np.ndarray, max_distance: int, earlier: tuple[int, ...]) -> np.ndarray:
    """Positions of the pairs (hash XORs) within `max_distance` whose hashes differ under every
    earlier band's mask: a pair equal under an earlier band was found there (its walk sees every
    equal-key pair). The masks are tested on the close pairs only, the few."""
    close = np.flatnonzero(np.bitwise_count(xor) <= max_distance)
    if earlier and len(close):
        found = xor[close]
        keep = np.ones(len(close), dtype=bool)
        for mask in earlier:
            keep &= (found & np.uint64(mask)) != 0
        close = close[keep]
    return close


def equal_key_pairs(packed: np.ndarray, index_bits: int, hashes: np.ndarray | None = None,
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
            keep = new_and_close(self.hashes[a] ^ self.hashes[b], self.max_distance, self.earlier)
            a, b = a[keep], b[keep]
        self.found_a.append(a)
        self.found_b.append(b)


def same_as_next(packed: np.ndarray, low: np.uint64) -> np.ndarray:
    """Positions whose word equals the next one above the bits `low`, chunk by chunk (in cache)."""
    found = [np.zeros(0, dtype=np.int64)]
    for start in range(0, len(packed) - 1, _CHUNK):
        stop = min(start + _CHUNK, len(packed) - 1)
        found.append(np.flatnonzero((packed[start + 1:stop + 1] ^ packed[start:stop]) <= low) + start)
    return np.concatenate(found)
