"""The embeddings artifact round-trips: float16 parts keyed by uid, float32 matrices back."""

import numpy as np
import polars as pl
import pytest

from cnclip.corpus.manifests.schemas import SchemaError
from cnclip.embed import store


def _unit(rows, width, seed):
    x = np.random.default_rng(seed).normal(size=(rows, width)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_parts_round_trip_in_part_order_within_float16_precision(tmp_path):
    a, b = _unit(3, 16, 0), _unit(2, 16, 1)
    store.write_part(store.frame_of([10, 11, 12], a, a[::-1]), tmp_path / "00000.parquet")
    store.write_part(store.frame_of([20, 21], b, b), tmp_path / "00001.parquet")
    store.write_model_record(tmp_path, "cnclip-checkpoint:x.pt", 16)
    ids, image = store.read_all(tmp_path)
    assert ids["uid"].to_list() == [10, 11, 12, 20, 21]
    assert image.dtype == np.float32 and image.shape == (5, 16)
    assert np.abs(image - np.concatenate([a, b])).max() < 2e-3
    _, text = store.read_all(tmp_path, "text_embedding")
    assert np.abs(text[:3] - a[::-1]).max() < 2e-3
    assert pl.read_parquet_schema(tmp_path / "00000.parquet")["image_embedding"] == pl.Array(pl.Float16(), 16)
    assert store.read_model_record(tmp_path) == {"model": "cnclip-checkpoint:x.pt", "width": 16}


def test_a_frame_that_is_not_the_table_is_refused_and_missing_parts_are_one_line(tmp_path):
    frame = store.frame_of([1], _unit(1, 8, 0), _unit(1, 8, 1)).with_columns(pl.lit("x").alias("stray"))
    with pytest.raises(SchemaError, match="stray"):
        store.write_part(frame, tmp_path / "p.parquet")
    with pytest.raises(store.EmbeddingsError, match="no embedding parts"):
        store.read_all(tmp_path)
    with pytest.raises(store.EmbeddingsError, match="model.json: missing"):
        store.read_model_record(tmp_path)
