"""One band's pairs in linear time: hashes bucketed by a mix of their band key, two levels deep,
and each small bucket checked pair by pair in cache.

A sort brings equal keys together at n log n, reading 80 MB arrays at 10M rows from memory on
every pass. Grouping needs no order, only that equal keys meet: level one is a counting-sort
partition of (hash, row) by the top bits of a mixed key (one histogram pass, one scatter pass,
a few hundred write heads: past that the scatter misses the TLB on every row); level two
counting-sorts each bucket by the next bits of the same mix into a table of about as many slots
as rows (in L2), and compares the rows of each slot with each other: equal keys always share a
slot, other keys rarely (about one compare per row). The compare reads both hashes from the
sorted bucket, in cache, so a candidate costs ~1 ns instead of two random reads from memory.

These loops have no numpy primitive (a histogram by computed key, a scatter, a walk of slots),
so they are compiled by numba. The machine code is cached on disk (`_compiled`), so only the
first process on a machine pays the compile (~3 s) and each later one a load (~0.4 s, most of it
numba's own lazy imports).
"""

from __future__ import annotations

import numpy as np
from numba import njit, types
from numba.extending import intrinsic

# Rows per level-one bucket wanted (its rows and slot table stay in L2), and the most level-one
# buckets (10M rows: 2^9 buckets of ~20k rows scattered in 35-55 ms; 2^11 took 70-130 ms).
_BUCKET_ROWS = 4096
_TOP_BITS = 9
# Two odd 64-bit constants of a multiply-xorshift mix (splitmix64's finalizer): equal keys mix
# equal, distinct keys spread over the buckets even when real hashes cluster in a few bits.
_MIX_1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX_2 = np.uint64(0x94D049BB133111EB)


def _compiled(**options):
    """numba's njit, its machine code cached where numba finds a writable folder: NUMBA_CACHE_DIR,
    else __pycache__ next to this file, else the user's cache folder. With none (a read-only install
    run by a user without a writable home) numba refuses `cache=True` with a RuntimeError at import,
    which would make every build fail at dedup; then the kernels compile in each process instead."""
    def wrap(func):
        try:
            return njit(cache=True, nogil=True, **options)(func)
        except RuntimeError:  # "cannot cache function ...: no locator available"
            return njit(nogil=True, **options)(func)
    return wrap


@_compiled(inline="always")
def _mix(key):
    """A 64-bit key's bits spread over all 64: bucket numbers are its top bits."""
    key = (key ^ (key >> np.uint64(30))) * _MIX_1
    key = (key ^ (key >> np.uint64(27))) * _MIX_2
    return key ^ (key >> np.uint64(31))


@_compiled()
def _partition(hashes, mask, top_bits, ids, out_hashes, out_rows, starts):
    """Counting-sort (hash, row) by the top `top_bits` of the mixed key into `out_*`; `starts`
    (2^top_bits + 1 entries) gets each bucket's first position. Stable: rows stay ascending.
    The histogram pass keeps each row's bucket in `ids`, so the scatter pass computes nothing
    and its loads run ahead of its stores."""
    shift = np.uint64(64 - top_bits)
    starts[:] = 0
    if top_bits == 0:
        for i in range(len(hashes)):
            out_hashes[i] = hashes[i]
            out_rows[i] = i
        starts[1] = len(hashes)
        return
    for i in range(len(hashes)):
        b = np.int64(_mix(hashes[i] & mask) >> shift)
        ids[i] = b
        starts[b + 1] += 1
    for b in range(1, len(starts)):
        starts[b] += starts[b - 1]
    heads = starts[:-1].copy()
    for i in range(len(hashes)):
        b = ids[i]
        position = heads[b]
        out_hashes[position] = hashes[i]
        out_rows[position] = i
        heads[b] = position + 1


@_compiled(inline="always")
def _new_and_close(x, max_distance, earlier):
    """A pair with hash XOR `x` is within the distance and shares no earlier band's key (a pair
    equal under an earlier band was found there)."""
    if np.int64(_popcount(x)) > max_distance:
        return False
    for e in range(len(earlier)):
        if (x & earlier[e]) == 0:
            return False
    return True


@intrinsic
def _popcount(typingctx, x):
    """The CPU's population count (LLVM's ctpop): numba has no bit_count of its own."""
    def codegen(context, builder, signature, args):
        return builder.ctpop(args[0])
    return types.uint64(types.uint64), codegen


@_compiled()
def _level_two(starts, top_bits, hashes, rows):
    """Scratch for level two, sized to the largest bucket: slot offsets, slots, and the bucket's
    (hash, row) in slot order."""
    largest = 1
    for b in range(len(starts) - 1):
        largest = max(largest, starts[b + 1] - starts[b])
    table_bits = 1
    while (1 << table_bits) < largest and table_bits < 64 - top_bits:
        table_bits += 1
    return (table_bits, np.zeros((1 << table_bits) + 1, dtype=np.int32), np.empty(largest, dtype=np.int32),
            np.empty(largest, dtype=hashes.dtype), np.empty(largest, dtype=rows.dtype))


@_compiled(inline="always")
def _sort_bucket(hashes, rows, first, size, mask, top_bits, table_bits, offsets, slots, sorted_hashes, sorted_rows):
    """Counting-sort one bucket by the next bits of the mix below the top ones, into a table of
    at least as many slots as rows (in cache): equal keys end up next to each other. Stable.
    Returns the slot count; offsets[s] is then where slot s ends (the caller zeroes them)."""
    bits = 1
    while (1 << bits) < size and bits < table_bits:
        bits += 1
    low, shift = np.uint64((1 << bits) - 1), np.uint64(64 - top_bits - bits)
    for j in range(size):
        slot = np.int32((_mix(hashes[first + j] & mask) >> shift) & low)
        slots[j] = slot
        offsets[slot + 1] += 1
    for t in range(1, (1 << bits) + 1):
        offsets[t] += offsets[t - 1]
    for j in range(size):
        position = offsets[slots[j]]
        offsets[slots[j]] = position + 1
        sorted_hashes[position] = hashes[first + j]
        sorted_rows[position] = rows[first + j]
    return 1 << bits


@_compiled()
def _bucket_pairs(hashes, rows, starts, mask, top_bits, max_distance, earlier, first_bucket, found_a, found_b):
    """Pairs within `max_distance` of equal band key inside the level-one buckets from
    `first_bucket` on, written to `found_*`. Returns (next bucket, pairs written): when the
    buffers fill up, the bucket that did not fit is left out, to be redone into bigger ones
    (the buffers are never reallocated here, which keeps the loop free of reference counting).
    Each row is compared with the rows after it in its slot, read in order, not chased."""
    table_bits, offsets, slots, sorted_hashes, sorted_rows = _level_two(starts, top_bits, hashes, rows)
    count = 0
    for b in range(first_bucket, len(starts) - 1):
        size, written = starts[b + 1] - starts[b], count
        table = _sort_bucket(hashes, rows, starts[b], size, mask, top_bits, table_bits, offsets, slots,
                             sorted_hashes, sorted_rows)
        start = 0
        for t in range(table):
            end = offsets[t]
            for p in range(start, end - 1):
                for q in range(p + 1, end):
                    x = sorted_hashes[p] ^ sorted_hashes[q]
                    if (x & mask) == 0 and _new_and_close(x, max_distance, earlier):
                        if count == len(found_a):
                            offsets[: table + 1] = 0
                            return b, written
                        found_a[count] = min(sorted_rows[p], sorted_rows[q])
                        found_b[count] = max(sorted_rows[p], sorted_rows[q])
                        count += 1
            start = end
        offsets[: table + 1] = 0
    return len(starts) - 1, count


@_compiled()
def _bucket_equals(hashes, rows, starts, top_bits, first_bucket, later, first_rows):
    """(row, first row of the same value) for every repeated value's later rows, as
    _bucket_pairs returns them. Rows ascend within a slot (both sorts are stable), so a value's
    first row in its slot is its first row; it marks its copies, which are then skipped: a value
    repeated k times costs k, not k * k."""
    mask = np.uint64(0xFFFFFFFFFFFFFFFF)
    table_bits, offsets, slots, sorted_hashes, sorted_rows = _level_two(starts, top_bits, hashes, rows)
    seen = np.zeros(len(slots), dtype=np.bool_)
    count = 0
    for b in range(first_bucket, len(starts) - 1):
        size, written = starts[b + 1] - starts[b], count
        table = _sort_bucket(hashes, rows, starts[b], size, mask, top_bits, table_bits, offsets, slots,
                             sorted_hashes, sorted_rows)
        seen[:size] = False
        start = 0
        for t in range(table):
            end = offsets[t]
            for p in range(start, end - 1):
                if seen[p]:
                    continue
                for q in range(p + 1, end):
                    if not seen[q] and sorted_hashes[q] == sorted_hashes[p]:
                        if count == len(later):
                            offsets[: table + 1] = 0
                            return b, written
                        seen[q] = True
                        later[count] = sorted_rows[q]
                        first_rows[count] = sorted_rows[p]
                        count += 1
            start = end
        offsets[: table + 1] = 0
    return len(starts) - 1, count


def top_bits_for(count: int) -> int:
    """Level-one buckets: about _BUCKET_ROWS rows each, but at most 2^_TOP_BITS of them (past a
    few hundred write heads the scatter misses the TLB and the cache on every row)."""
    return min(_TOP_BITS, max(0, int(np.ceil(np.log2(max(count, 1) / _BUCKET_ROWS)))))


class BandBuckets:
    """Buffers reused by every band of one search, and by the search after the group-by on
    equal hashes (`over`): an array past glibc's mmap threshold comes back from the kernel as
    fresh pages to fault in on every allocation (at 10M rows 140 MB, ~0.2 s here)."""

    def __init__(self, hashes: np.ndarray, reuse: BandBuckets | None = None) -> None:
        self.hashes = np.ascontiguousarray(hashes, dtype=np.uint64)
        count = len(self.hashes)
        self.top_bits = top_bits_for(count)
        rows_dtype = np.int32 if count < 2**31 else np.int64
        if reuse is not None and len(reuse.bucket_hashes) >= count and reuse.bucket_rows.dtype == rows_dtype:
            self.ids, self.bucket_hashes = reuse.ids[:count], reuse.bucket_hashes[:count]
            self.bucket_rows = reuse.bucket_rows[:count]
        else:
            self.ids = np.empty(count, dtype=np.uint16)
            self.bucket_hashes = np.empty(count, dtype=np.uint64)
            self.bucket_rows = np.empty(count, dtype=rows_dtype)
        self.starts = np.empty((1 << self.top_bits) + 1, dtype=np.int64)

    def over(self, hashes: np.ndarray) -> BandBuckets:
        """Buckets for other (no more) hashes in this one's buffers."""
        return BandBuckets(hashes, reuse=self)

    def pairs(self, band_mask: int, max_distance: int, earlier: tuple[int, ...] = ()) -> tuple[np.ndarray, np.ndarray]:
        """Row pairs (a < b) whose hashes agree on `band_mask`, lie within `max_distance` bits, and
        differ under every mask in `earlier`."""
        mask, earlier_masks = np.uint64(band_mask), np.array(earlier, dtype=np.uint64)
        _partition(self.hashes, mask, self.top_bits, self.ids, self.bucket_hashes, self.bucket_rows, self.starts)
        return self._collect(lambda bucket, a, b: _bucket_pairs(
            self.bucket_hashes, self.bucket_rows, self.starts, mask, self.top_bits, max_distance, earlier_masks,
            bucket, a, b))

    def equals(self) -> tuple[np.ndarray, np.ndarray]:
        """(row, first row with the same value) for every row whose value appeared at a lower row."""
        _partition(self.hashes, np.uint64(2**64 - 1), self.top_bits, self.ids, self.bucket_hashes, self.bucket_rows,
                   self.starts)
        return self._collect(lambda bucket, a, b: _bucket_equals(
            self.bucket_hashes, self.bucket_rows, self.starts, self.top_bits, bucket, a, b))

    def _collect(self, kernel) -> tuple[np.ndarray, np.ndarray]:
        """Run a bucket kernel over every bucket into buffers, doubled when one bucket overflows them."""
        found_a, found_b, bucket, buckets = [], [], 0, len(self.starts) - 1
        capacity = max(1024, len(self.hashes) // 256)
        while bucket < buckets:
            a = np.empty(capacity, dtype=self.bucket_rows.dtype)
            b = np.empty(capacity, dtype=self.bucket_rows.dtype)
            next_bucket, count = kernel(bucket, a, b)
            found_a.append(a[:count])
            found_b.append(b[:count])
            if next_bucket == bucket:  # one bucket holds more results than the buffers
                capacity *= 2
            bucket = next_bucket
        return (np.concatenate(found_a).astype(np.int64, copy=False),
                np.concatenate(found_b).astype(np.int64, copy=False))
