import numpy as np
import polars as pl
import pytest

from cnclip.corpus.ops.dedup import eval_overlaps, find_duplicates, near_duplicates, text_duplicates
from cnclip.corpus.ops.neardup import block_masks, choose_blocks, group_representatives, near_pairs
from cnclip.corpus.recipe import DedupSettings


def random_hashes(count, seed=0):
    rng = np.random.default_rng(seed)
    return np.unique(rng.integers(0, 2**64 - 1, count, dtype=np.uint64, endpoint=True))


def flip(value, bits):
    for bit in bits:
        value ^= np.uint64(1) << np.uint64(bit)
    return value


def brute_force(hashes, max_distance):
    distances = np.bitwise_count(hashes[:, None] ^ hashes[None, :])
    a, b = np.nonzero(np.triu(distances <= max_distance, k=1))
    return set(zip(a.tolist(), b.tolist(), strict=True))


@pytest.mark.parametrize("max_distance", [1, 2, 4, 6])
def test_near_pairs_equal_brute_force(max_distance):
    rng = np.random.default_rng(max_distance)
    base = random_hashes(1500, seed=max_distance)
    planted = [flip(h, rng.choice(64, rng.integers(1, max_distance + 3), replace=False)) for h in base[:300]]
    hashes = np.unique(np.concatenate([base, np.array(planted, dtype=np.uint64)]))
    expected = brute_force(hashes, max_distance)
    assert len(expected) > 50
    for blocks in (None, max_distance + 1, max_distance + 3):
        a, b = near_pairs(hashes, max_distance, blocks)
        assert set(zip(a.tolist(), b.tolist(), strict=True)) == expected


def test_blocks_cover_all_bits_and_grow_with_size():
    for blocks in range(1, 12):
        masks = block_masks(blocks)
        assert sum(masks) == 2**64 - 1 and all(m & n == 0 for i, m in enumerate(masks) for n in masks[i + 1:])
    assert choose_blocks(1_000, 4) <= choose_blocks(1_000_000, 4) <= choose_blocks(100_000_000, 4)
    assert choose_blocks(10, 0) == 1


def test_groups_are_connected_components():
    # 0-1-2 chained, 3-4 paired, 5 alone; edges in any order.
    reps = group_representatives(6, np.array([2, 4, 1]), np.array([1, 3, 0]))
    assert reps.tolist() == [0, 0, 0, 3, 3, 5]


def test_chain_is_one_group_kept_at_its_first_row():
    a = np.uint64(0)
    b = flip(a, range(4))       # 4 bits from a
    c = flip(b, range(4, 8))    # 4 bits from b, 8 from a
    far = flip(a, range(20, 60))
    uids = np.array([10, 11, 12, 13])
    found = near_duplicates(uids, np.array([b, c, a, far], dtype=np.uint64), 4)
    # uid 10 (hash b) is first; the chain pulls in c (uid 11) and a (uid 12) though a~c is 8 bits.
    assert found.select("uid", "duplicate_of_uid").rows() == [(11, 10), (12, 10)]
    assert found["reason"].unique().to_list() == ["dedup:near_duplicate"]


def rows_frame(uids, sha, hashes, captions):
    return pl.DataFrame({"uid": uids, "sha256": sha, "phash": hashes, "caption": captions},
                        schema={"uid": pl.Int64, "sha256": pl.String, "phash": pl.UInt64, "caption": pl.String})


def test_find_duplicates_rules_in_order_and_independent_of_row_order():
    hashes = random_hashes(400, seed=7)[:400]
    count = len(hashes)
    uids = np.arange(count) * 3 + 5
    sha = [f"sha{i}" for i in range(count)]
    captions = [f"标题{i}" for i in range(count)]
    sha[50] = sha[10]                               # exact copy of row 10
    hashes[60] = flip(hashes[20], [1, 2, 3])        # near copy of row 20
    hashes[70] = flip(hashes[30], [5, 6, 7, 8, 9, 10, 11, 12])  # 8 bits: not near...
    captions[70] = captions[30]                     # ...but same caption: a text duplicate
    evals = pl.DataFrame({"id": ["e0", "e1"], "phash": [flip(hashes[40], [0, 1]), hashes[40]]},
                         schema={"id": pl.String, "phash": pl.UInt64})
    frame = rows_frame(uids, sha, hashes, captions)
    settings = DedupSettings(text=True, text_max_distance=10)
    expected = find_duplicates(frame.lazy(), settings, evals)
    assert expected.select("uid", "reason", "duplicate_of_uid", "duplicate_of_eval").rows() == [
        (uids[40], "dedup:eval_overlap", None, "e0"),
        (uids[50], "dedup:exact_duplicate", uids[10], None),
        (uids[60], "dedup:near_duplicate", uids[20], None),
        (uids[70], "dedup:text_duplicate", uids[30], None),
    ]
    for seed in range(3):
        shuffled = frame.sample(fraction=1.0, shuffle=True, seed=seed)
        assert find_duplicates(shuffled.lazy(), settings, evals).equals(expected)
    # Switches off: only what is asked for.
    off = find_duplicates(frame.lazy(), DedupSettings(exact=False, near=False))
    assert off.height == 0


def test_eval_overlap_names_the_first_matching_image_and_distance():
    train = random_hashes(3, seed=11)
    evals = np.array([flip(train[1], [3]), train[1], random_hashes(1, seed=12)[0]], dtype=np.uint64)
    found = eval_overlaps(np.array([1, 2, 3]), train, ["a", "b", "c"], evals, 4)
    assert found.select("uid", "duplicate_of_eval", "detail").rows() == [(2, "a", "pHash distance 1")]


def test_text_duplicates_need_the_same_caption():
    frame = rows_frame([1, 2, 3], ["x", "y", "z"], [0, 2**12 - 1, 2**12 - 1], ["同一个标题", "同一个标题", "另一个标题"])
    found = text_duplicates(frame, 12)
    assert found.select("uid", "duplicate_of_uid").rows() == [(2, 1)]
    assert text_duplicates(frame, 11).height == 0


def test_eval_sets_from_folders_and_tars_hash_alike(tmp_path):
    import webdataset as wds
    from PIL import Image

    from cnclip.corpus.ops.eval_hashes import hash_eval_images
    from cnclip.corpus.recipe import ImageSettings
    from test_hashing import encode, textured

    folder = tmp_path / "images"
    folder.mkdir()
    with wds.TarWriter(str(tmp_path / "eval-000.tar")) as tar:
        for i in range(4):
            data = encode(textured(100 + i, 160))
            (folder / f"{i}.jpg").write_bytes(data)
            tar.write({"__key__": f"{i:03d}", "jpg": data, "txt": "标题"})
    settings = ImageSettings(size=64)
    from_folder = hash_eval_images(str(folder), settings)
    from_tar = hash_eval_images(str(tmp_path / "eval-*.tar"), settings)
    assert from_folder["id"].to_list() == ["0.jpg", "1.jpg", "2.jpg", "3.jpg"]
    assert from_tar["id"].to_list() == [f"eval-000.tar/{i:03d}" for i in range(4)]
    assert from_folder["phash"].to_list() == from_tar["phash"].to_list()
    assert from_folder["phash"].n_unique() == 4
    assert Image.open(folder / "0.jpg").size == (160, 160)
