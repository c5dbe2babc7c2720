"""The compiled band buckets behind near dedup: results equal to brute force when the buckets are
forced small (many level-one buckets, rows spilling across them), when one bucket holds more
pairs than the result buffers (the resume path), and for a value repeated many times; and the
kernels still run where numba has no folder to cache them in."""

import os
import subprocess
import sys
from itertools import combinations

import numpy as np

from cnclip.corpus.ops import band_buckets
from cnclip.corpus.ops.band_buckets import BandBuckets
from cnclip.corpus.ops.neardup import equal_pairs, near_pairs
from conftest import flip


def brute(hashes, mask, d):
    return sorted((i, j) for i, j in combinations(range(len(hashes)), 2)
                  if (int(hashes[i]) ^ int(hashes[j])) & mask == 0 and bin(int(hashes[i]) ^ int(hashes[j])).count("1") <= d)


def test_small_buckets_find_every_pair_of_equal_key(monkeypatch):
    # 4 rows per level-one bucket: 256 buckets over 1,000 hashes, so a key's rows cross none.
    monkeypatch.setattr(band_buckets, "_BUCKET_ROWS", 4)
    rng = np.random.default_rng(7)
    base = rng.integers(0, 2**64 - 1, 500, dtype=np.uint64, endpoint=True)
    hashes = np.unique(np.concatenate([base, [flip(h, [int(rng.integers(64))]) for h in base]]).astype(np.uint64))
    buckets = BandBuckets(hashes)
    assert buckets.top_bits == 8
    mask = 0xFFFF_0000_0000_0000
    a, b = buckets.pairs(mask, 2)
    assert sorted(zip(a.tolist(), b.tolist(), strict=True)) == brute(hashes, mask, 2)
    # Pairs equal under an earlier band's mask are left to that band.
    a, b = buckets.pairs(mask, 2, earlier=(0x0000_FFFF_0000_0000,))
    assert sorted(zip(a.tolist(), b.tolist(), strict=True)) == [
        (i, j) for i, j in brute(hashes, mask, 2) if (int(hashes[i]) ^ int(hashes[j])) & 0x0000_FFFF_0000_0000]


def test_a_bucket_with_more_pairs_than_the_buffers_is_redone_into_bigger_ones():
    # 80 hashes equal on the top 56 bits: 3,160 pairs in one bucket, over the 1,024 first allotted.
    rng = np.random.default_rng(1)
    top = np.uint64(0xABCD_EF01_2345_6700)
    noise = rng.integers(0, 256, 300, dtype=np.uint64)
    hashes = np.unique(np.concatenate([top | noise, rng.integers(0, 2**64 - 1, 50, dtype=np.uint64, endpoint=True)]))
    a, b = BandBuckets(hashes).pairs(0xFFFF_FFFF_FFFF_FF00, 8)
    found = sorted(zip(a.tolist(), b.tolist(), strict=True))
    assert found == brute(hashes, 0xFFFF_FFFF_FFFF_FF00, 8) and len(found) > 1024


def test_equal_values_point_at_their_first_row_in_any_bucket_layout(monkeypatch):
    monkeypatch.setattr(band_buckets, "_BUCKET_ROWS", 2)
    rng = np.random.default_rng(3)
    hashes = rng.integers(0, 40, 3000).astype(np.uint64) * np.uint64(0x9E37_79B9_7F4A_7C15)
    later, first = equal_pairs(hashes)
    expected, seen = [], {}
    for row, value in enumerate(hashes.tolist()):
        if value in seen:
            expected.append((row, seen[value]))
        seen.setdefault(value, row)
    assert sorted(zip(later.tolist(), first.tolist(), strict=True)) == expected


def test_near_pairs_over_reused_buffers_equal_fresh_ones():
    rng = np.random.default_rng(4)
    hashes = np.unique(rng.integers(0, 2**64 - 1, 3000, dtype=np.uint64, endpoint=True))
    hashes = np.unique(np.concatenate([hashes, [flip(h, [1, 40]) for h in hashes[:300]]]).astype(np.uint64))
    lender = BandBuckets(np.concatenate([hashes, hashes]))
    fresh = near_pairs(hashes, 3)
    reused = near_pairs(hashes, 3, reuse=lender)
    assert [x.tolist() for x in reused] == [x.tolist() for x in fresh] and len(fresh[0]) >= 300


def test_no_writable_cache_folder_compiles_in_the_process_instead_of_failing(tmp_path):
    # A read-only install run by a user without a writable home: numba finds no folder for its
    # cache (simulated by leaving it only the locator for IPython cells, which never matches a
    # file), and cache=True alone would raise at import.
    code = ("import numpy as np; from cnclip.corpus.ops.neardup import equal_pairs, near_pairs; "
            "print([x.tolist() for x in near_pairs(np.array([1, 3, 2**40], dtype=np.uint64), 1)],"
            " [x.tolist() for x in equal_pairs(np.array([5, 7, 5], dtype=np.uint64))])")
    env = {**os.environ, "NUMBA_CACHE_LOCATOR_CLASSES": "IPythonCacheLocator"}
    env.pop("NUMBA_CACHE_DIR", None)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[[0], [1]] [[2], [0]]"
