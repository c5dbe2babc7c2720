"""The search index over stored embeddings: kinds, the row mapping, staleness, one-line errors."""

import os

import numpy as np
import polars as pl
import pytest
from typer.testing import CliRunner

from cnclip.cli import app
from cnclip.corpus.manifests.schemas import PUBLISHED_EMBEDDINGS
from cnclip.embed import store
from cnclip.search import index as idx


def _unit(rng, n, width):
    vectors = rng.normal(size=(n, width)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def write_embeddings(manifest_dir, per_shard=(40, 25, 35), width=16, seed=0, clustered=False):
    """Published embedding parts of random unit rows; returns all image rows in part order."""
    rng = np.random.default_rng(seed)
    out, uid, everything = manifest_dir / "embeddings", 0, []
    centres = _unit(rng, 8, width)
    for shard, n in enumerate(per_shard):
        image = _unit(rng, n, width)
        if clustered:
            image = centres[rng.integers(0, 8, n)] + 0.15 * image
            image /= np.linalg.norm(image, axis=1, keepdims=True)
        keys = [f"{shard:03d}{i:04d}" for i in range(n)]
        frame = store.frame_of(list(range(uid, uid + n)), image, _unit(rng, n, width), key=keys,
                               clip_score=np.zeros(n, np.float32))
        store.write_part(frame.select(list(PUBLISHED_EMBEDDINGS.columns)), out / f"{shard:05d}.parquet",
                         PUBLISHED_EMBEDDINGS)
        stored = image.astype(np.float16).astype(np.float32)
        everything.append(stored / np.linalg.norm(stored, axis=1, keepdims=True))
        uid += n
    store.write_model_record(out, "some-model.pt", width)
    return np.concatenate(everything)


def test_flat_index_maps_rows_to_shard_key_uid_and_finds_each_stored_vector(tmp_path):
    vectors = write_embeddings(tmp_path)
    record = idx.build_index(tmp_path)
    assert (record["kind"], record["rows"], record["width"], record["requested"]) == ("flat", 100, 16, "auto")
    loaded = idx.load_index(tmp_path)
    assert loaded.rows.columns == ["shard", "key", "uid"]
    assert loaded.rows["shard"].to_list() == [0] * 40 + [1] * 25 + [2] * 35
    assert loaded.rows["uid"].to_list() == list(range(100))
    assert loaded.rows.row(45) == (1, "0010005", 45)
    scores, rows = loaded.index.search(vectors[[3, 45, 99]], 1)
    assert rows[:, 0].tolist() == [3, 45, 99]
    assert scores[:, 0] == pytest.approx(1.0, abs=1e-5)


def test_auto_picks_flat_up_to_the_threshold_and_ivf_above(tmp_path, monkeypatch):
    write_embeddings(tmp_path, per_shard=(300, 300), clustered=True)
    monkeypatch.setattr(idx, "FLAT_MAX_ROWS", 600)
    assert idx.build_index(tmp_path)["kind"] == "flat"
    monkeypatch.setattr(idx, "FLAT_MAX_ROWS", 599)
    record = idx.build_index(tmp_path)
    assert record["kind"] == "ivf" and record["params"]["nlist"] == 600 // idx.TRAIN_PER_LIST
    assert idx.load_index(tmp_path).index.nprobe == record["params"]["nprobe"]


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_kinds_agree_with_flat_on_clustered_rows(tmp_path, kind):
    vectors = write_embeddings(tmp_path, per_shard=(400, 400), clustered=True, width=32)
    idx.build_index(tmp_path, "flat")
    _, exact = idx.load_index(tmp_path).index.search(vectors[:50], 10)
    idx.build_index(tmp_path, kind)
    loaded = idx.load_index(tmp_path)
    assert loaded.record["kind"] == kind
    _, found = loaded.index.search(vectors[:50], 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(exact, found, strict=True)])
    assert recall >= 0.9, recall


def test_an_index_is_stale_when_a_part_or_the_model_changes_and_is_rebuilt(tmp_path):
    write_embeddings(tmp_path)
    assert idx.stale_reason(tmp_path, idx.read_record(tmp_path)) == "no index yet"
    first = idx.ensure_index(tmp_path).record
    assert idx.stale_reason(tmp_path, idx.read_record(tmp_path)) is None
    assert idx.ensure_index(tmp_path).record["build"] == first["build"]  # fresh: reused, not rebuilt

    write_embeddings(tmp_path, per_shard=(40, 25, 36), seed=1)  # a rerun of the embed stage
    assert idx.stale_reason(tmp_path, idx.read_record(tmp_path)) == \
        "the embedding parts changed since the index was built"
    said = []
    rebuilt = idx.ensure_index(tmp_path, notify=said.append)
    assert rebuilt.index.ntotal == 101 and rebuilt.record["build"] != first["build"]
    assert said == [f"building the search index of {tmp_path} (the embedding parts changed since the index was built)"]
    # The earlier build's files are gone; nothing else in the folder is touched.
    names = sorted(p.name for p in (tmp_path / "index").iterdir())
    assert names == sorted(["index.json", rebuilt.record["index_file"], rebuilt.record["rows_file"]])

    store.write_model_record(tmp_path / "embeddings", "another-model.pt", 16)
    assert idx.stale_reason(tmp_path, idx.read_record(tmp_path)) == \
        "embeddings/model.json changed since the index was built"


def test_a_rebuild_keeps_the_users_own_files_and_the_kind_last_asked_for(tmp_path):
    write_embeddings(tmp_path)
    idx.build_index(tmp_path, "hnsw")
    mine = tmp_path / "index" / "notes.txt"
    mine.write_text("mine", encoding="utf-8")
    part = tmp_path / "embeddings" / "00001.parquet"
    os.utime(part, ns=(part.stat().st_atime_ns, part.stat().st_mtime_ns + 10**9))
    assert idx.ensure_index(tmp_path).record["kind"] == "hnsw"
    assert mine.read_text(encoding="utf-8") == "mine"


def test_a_damaged_record_is_a_missing_index(tmp_path):
    write_embeddings(tmp_path)
    idx.build_index(tmp_path)
    (tmp_path / "index" / "index.json").write_text("{not json", encoding="utf-8")
    assert idx.stale_reason(tmp_path, idx.read_record(tmp_path)) == "no index yet"
    assert idx.ensure_index(tmp_path).index.ntotal == 100


def test_a_part_of_another_width_is_refused_naming_it(tmp_path):
    write_embeddings(tmp_path)
    store.write_model_record(tmp_path / "embeddings", "some-model.pt", 32)
    with pytest.raises(idx.SearchError, match=r"00000\.parquet: embeddings 16 wide, model.json says 32$"):
        idx.build_index(tmp_path)
    assert not (tmp_path / "index" / "index.json").exists()


def test_cli_index_errors_are_one_line(tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["corpus", "index", str(tmp_path)])
    assert result.exit_code == 2
    assert result.output == f"error: {tmp_path / 'embeddings'}: missing (the corpus was built without an embed section)\n"
    (tmp_path / "embeddings").mkdir()
    result = runner.invoke(app, ["corpus", "index", str(tmp_path)])
    assert result.output == f"error: {tmp_path / 'embeddings'}: no embedding parts (*.parquet)\n"
    write_embeddings(tmp_path)
    result = runner.invoke(app, ["corpus", "index", str(tmp_path), "--kind", "lsh"])
    assert result.exit_code == 2 and result.output == "error: --kind lsh: not one of auto, flat, ivf, hnsw\n"
    result = runner.invoke(app, ["corpus", "index", str(tmp_path), "--kind", "flat"])
    assert result.exit_code == 0, result.output
    assert pl.read_parquet(next((tmp_path / "index").glob("rows-*.parquet"))).height == 100


@pytest.mark.parametrize("args", [["search", "--help"], ["corpus", "index", "--help"]], ids=" ".join)
def test_search_help_loads_no_heavy_module(args):
    from test_cli_imports import probe

    result = probe(*args)
    assert result["exit"] == 0 and "Usage: " in result["output"]
    assert result["loaded"] == []
