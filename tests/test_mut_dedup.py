"""Dedup rules at their edges: thresholds, nulls, rule order, the names a dropped row points at,
and the pair search's plans and cost model."""

from itertools import combinations
from math import comb

import numpy as np
import polars as pl
import pytest

from cnclip.corpus.ops.dedup import (
    DECISION_SCHEMA,
    eval_overlaps,
    exact_duplicates,
    find_duplicates,
    near_duplicates,
    text_duplicates,
)
from cnclip.corpus.ops.neardup import _compact_keys, block_masks, choose_blocks, near_pairs
from cnclip.corpus.recipe import DedupSettings
from cnclip.corpus.stages.dedup import scan_dedup_input
from cnclip.corpus.stages.download_attempts import write_attempts
from conftest import flip


def u64(*values):
    return np.array(values, dtype=np.uint64)


def rows(uids, sha, hashes, captions=None):
    captions = captions or [f"标题{u}" for u in uids]
    return pl.DataFrame({"uid": uids, "sha256": sha, "phash": hashes, "caption": captions},
                        schema={"uid": pl.Int64, "sha256": pl.String, "phash": pl.UInt64, "caption": pl.String})


def test_exact_keeps_the_lowest_uid_and_ignores_missing_digests():
    frame = rows([9, 3, 5, 7, 8], ["s", "s", "s", None, None], [1, 2, 3, 4, 5])
    found = exact_duplicates(frame.lazy())
    assert found.schema == pl.Schema(DECISION_SCHEMA)
    assert found.rows() == [(5, "dedup:exact_duplicate", 3, None, "same sha256"),
                            (9, "dedup:exact_duplicate", 3, None, "same sha256")]


def test_eval_overlap_threshold_is_inclusive():
    base = np.uint64(0x0F0F_0F0F_0F0F_0F0F)
    train = u64(flip(base, range(3)), flip(base, range(4)), flip(base, range(20, 40)))
    found = eval_overlaps(np.array([1, 2, 3]), train, ["e"], u64(base), 3)
    assert found.schema == pl.Schema(DECISION_SCHEMA)
    assert found.select("uid", "reason", "duplicate_of_uid", "duplicate_of_eval", "detail").rows() == [
        (1, "dedup:eval_overlap", None, "e", "pHash distance 3")]


def test_eval_overlap_names_the_first_listed_of_several_matches():
    base = np.uint64(12345)
    evals = u64(flip(base, [40]), base, flip(base, [1, 2]))
    found = eval_overlaps(np.array([7, 8]), u64(base, flip(base, [50, 51, 52, 53, 54, 55])), ["x", "y", "z"], evals, 2)
    assert found.select("uid", "duplicate_of_eval", "detail").rows() == [(7, "x", "pHash distance 1")]
    later = eval_overlaps(np.array([7]), u64(base), ["x", "y"], u64(flip(base, [1, 2, 3]), base), 2)
    assert later.select("duplicate_of_eval", "detail").rows() == [("y", "pHash distance 0")]


def test_eval_overlap_without_eval_images_or_rows():
    assert eval_overlaps(np.array([1]), u64(5), [], u64(), 4).height == 0
    empty = eval_overlaps(np.array([], dtype=np.int64), u64(), ["e"], u64(5), 4)
    assert empty.height == 0 and empty.schema == pl.Schema(DECISION_SCHEMA)


def test_near_threshold_is_inclusive_and_equal_hashes_are_duplicates():
    base = np.uint64(0xFFFF_0000_FFFF_0000)
    hashes = u64(base, flip(base, range(4)), flip(base, range(30, 35)), base)
    found = near_duplicates(np.array([10, 11, 12, 13]), hashes, 4)
    assert found.select("uid", "duplicate_of_uid", "detail").rows() == [
        (11, 10, "pHash distance 4 to the kept image"), (13, 10, "pHash distance 0 to the kept image")]
    empty = near_duplicates(np.array([], dtype=np.int64), u64(), 4)
    assert empty.height == 0 and empty.schema == pl.Schema(DECISION_SCHEMA)


def test_near_duplicates_of_a_later_group():
    a, b = np.uint64(0), flip(0, range(10, 50))
    found = near_duplicates(np.array([1, 2, 3, 4]), u64(b, a, flip(b, [0]), flip(a, [63])), 1)
    assert found.select("uid", "duplicate_of_uid").rows() == [(3, 1), (4, 2)]


def test_text_duplicates_group_a_caption_to_its_first_row():
    frame = rows([1, 2, 3, 4], ["a", "b", "c", "d"], [0, 1, 3, (2**40 - 1) << 8], ["同", "同", "同", "同"])
    found = text_duplicates(frame, 2)
    assert found.select("uid", "reason", "duplicate_of_uid", "detail").rows() == [
        (2, "dedup:text_duplicate", 1, "same caption, near-identical image"),
        (3, "dedup:text_duplicate", 1, "same caption, near-identical image"),
    ]
    assert text_duplicates(frame.head(1), 2).schema == pl.Schema(DECISION_SCHEMA)


def test_rules_drop_each_row_once_and_an_eval_drop_keeps_its_neighbour():
    base = np.uint64(0xABCD_EF01_2345_6789)
    frame = rows([1, 2, 3, 4, 5], ["s1", "s1", "s3", "s4", None],
                 [base, base, flip(base, [1]), flip(base, [60, 61, 62, 63, 0, 1, 2]), None])
    evals = pl.DataFrame({"id": ["e"], "phash": [flip(base, [0, 60, 61, 62, 63])]},
                         schema={"id": pl.String, "phash": pl.UInt64})
    found = find_duplicates(frame.lazy(), DedupSettings(phash_max_distance=2), evals)
    # 2: exact copy of 1 (not also near); 4: within 2 of the eval image; 3: near 1; 5: no pHash
    assert found.select("uid", "reason", "duplicate_of_uid", "duplicate_of_eval").rows() == [
        (2, "dedup:exact_duplicate", 1, None), (3, "dedup:near_duplicate", 1, None),
        (4, "dedup:eval_overlap", None, "e")]
    no_exact = find_duplicates(frame.lazy(), DedupSettings(exact=False, phash_max_distance=2), evals)
    assert no_exact.select("uid", "reason").rows() == [
        (2, "dedup:near_duplicate"), (3, "dedup:near_duplicate"), (4, "dedup:eval_overlap")]
    no_near = find_duplicates(frame.lazy(), DedupSettings(near=False, phash_max_distance=2))
    assert no_near.select("uid", "reason").rows() == [(2, "dedup:exact_duplicate")]


def test_an_eval_dropped_row_is_not_kept_as_a_near_group_head():
    base = np.uint64(0x1111_2222_3333_4444)
    frame = rows([1, 2], ["a", "b"], [base, flip(base, [0, 1])])
    evals = pl.DataFrame({"id": ["e"], "phash": [base]}, schema={"id": pl.String, "phash": pl.UInt64})
    found = find_duplicates(frame.lazy(), DedupSettings(phash_max_distance=1), evals)
    assert found.select("uid", "reason").rows() == [(1, "dedup:eval_overlap")]


def test_text_rule_sees_only_rows_no_other_rule_dropped():
    base = np.uint64(77)
    frame = rows([1, 2, 3], ["a", "b", "c"], [base, flip(base, [5]), flip(base, [5, 6, 7, 8, 9, 10])],
                 ["同", "同", "同"])
    found = find_duplicates(frame.lazy(), DedupSettings(text=True, text_max_distance=6, phash_max_distance=1))
    assert found.select("uid", "reason", "duplicate_of_uid").rows() == [
        (2, "dedup:near_duplicate", 1), (3, "dedup:text_duplicate", 1)]


def test_everything_off_decides_nothing():
    frame = rows([1, 2], ["a", "a"], [0, 0])
    found = find_duplicates(frame.lazy(), DedupSettings(exact=False, near=False))
    assert found.height == 0 and found.schema == pl.Schema(DECISION_SCHEMA)
    empty_evals = pl.DataFrame(schema={"id": pl.String, "phash": pl.UInt64})
    assert find_duplicates(frame.lazy(), DedupSettings(exact=False, near=False), empty_evals).height == 0


def test_scan_dedup_input_joins_successes_hashes_and_captions(tmp_path):
    download, hashes = tmp_path / "download", tmp_path / "hash"
    download.mkdir()
    hashes.mkdir()
    pl.DataFrame({"uid": [1, 2, 3], "key": ["0", "1", "2"], "status": ["success", "failed_to_download", "success"],
                  "error_message": [None, "x", None], "width": [1, None, 1], "height": [1, None, 1],
                  "original_width": [1, None, 1], "original_height": [1, None, 1], "sha256": ["a", None, "c"]},
                 schema_overrides={"width": pl.Int64, "height": pl.Int64, "original_width": pl.Int64,
                                   "original_height": pl.Int64}).write_parquet(download / "00000.parquet")
    write_attempts(download)  # img2dataset's results read once, as the download stage does
    pl.DataFrame({"uid": [1], "phash": [9]}, schema={"uid": pl.Int64, "phash": pl.UInt64}
                 ).write_parquet(hashes / "00000.parquet")
    accepted = pl.LazyFrame({"uid": [1, 2, 3], "caption": ["甲", "乙", "丙"], "url": ["u1", "u2", "u3"]})
    out = scan_dedup_input(download, hashes, accepted).sort("uid").collect()
    assert out.columns == ["uid", "sha256", "phash", "caption"]
    assert out.rows() == [(1, "a", 9, "甲"), (3, "c", None, "丙")]


# --- neardup ---------------------------------------------------------------------------------

def test_block_masks_are_contiguous_widest_first():
    assert block_masks(3) == [((1 << 22) - 1) << 42, ((1 << 21) - 1) << 21, (1 << 21) - 1]
    assert block_masks(1) == [2**64 - 1]


def expected_blocks(count, d):
    """The cost model of neardup's docstring: tables × (sort + verify the expected candidates)."""
    def cost(m):
        return comb(m, m - d) * (count + 0.08 * count * count / 2 * 2.0 ** (-64 * (m - d) / m))
    return min(range(d + 1, min(64, d + 8) + 1), key=cost)


@pytest.mark.parametrize("count, d", [(1_000, 4), (10_000_000, 4), (10_000_000, 2), (100, 1), (10**9, 8),
                                      (1_000, 8), (10**11, 8)])
def test_choose_blocks_minimizes_the_estimated_cost(count, d):
    assert choose_blocks(count, d) == expected_blocks(count, d)
    assert choose_blocks(count, 0) == 1


def brute(hashes, d):
    return {(i, j) for i, j in combinations(range(len(hashes)), 2)
            if bin(int(hashes[i]) ^ int(hashes[j])).count("1") <= d}


@pytest.mark.parametrize("d, blocks", [(1, 9), (2, 3), (3, None), (1, 2)])
def test_near_pairs_of_forced_and_chosen_plans(d, blocks):
    rng = np.random.default_rng(d)
    base = np.unique(rng.integers(0, 2**64 - 1, 300, dtype=np.uint64, endpoint=True))
    near = [flip(h, rng.choice(64, rng.integers(1, d + 2), replace=False)) for h in base[:120]]
    hashes = np.unique(np.concatenate([base, np.array(near, dtype=np.uint64)]))
    a, b = near_pairs(hashes, d, blocks)
    assert set(zip(a.tolist(), b.tolist(), strict=True)) == brute(hashes, d)
    assert (a < b).all()


def test_near_pairs_of_too_few_hashes_or_distance_zero():
    for hashes, d in ((u64(), 3), (u64(1), 3), (u64(1, 3), 0)):
        a, b = near_pairs(hashes, d)
        assert a.tolist() == [] and b.tolist() == []
    a, b = near_pairs(u64(1, 3), 1)
    assert (a.tolist(), b.tolist()) == ([0], [1])


def test_compact_keys_pack_the_chosen_blocks_low_bits_first():
    masks = block_masks(4)  # 16-bit blocks, the highest bits first
    hashes = u64(0x1234_5678_9ABC_DEF0, 0xFFFF_0000_FFFF_0000)
    keys, width = _compact_keys(hashes, masks, (0, 2))
    assert width == 32
    assert [hex(int(k)) for k in keys] == [hex(0x9ABC_1234), hex(0xFFFF_FFFF)]
    keys, width = _compact_keys(hashes, masks, (3,))
    assert (width, [int(k) for k in keys]) == (16, [0xDEF0, 0])
