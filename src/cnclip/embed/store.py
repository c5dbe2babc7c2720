"""The embeddings artifact: float16 Parquet parts keyed by uid (manifests/schemas.py, EMBEDDINGS
and PUBLISHED_EMBEDDINGS), and one `model.json` beside them naming the model and its width.

float16 halves the bytes of float32 at a cosine error of ~1e-3, far below any threshold a filter
or a search ranks by (clip-retrieval stores float16 for the same reason). Readers get float32
matrices (what faiss and numpy compute in) with the rows' uids, one part at a time or all.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import polars as pl

from cnclip._common.atomic import write_json_atomic
from cnclip._common.errors import CnclipError
from cnclip.corpus.manifests.schemas import EMBEDDINGS, PUBLISHED_EMBEDDINGS, Table

MODEL_RECORD = "model.json"


class EmbeddingsError(CnclipError, ValueError):
    """No embeddings where asked, or parts of different widths or models."""


def embeddings_table(width: int, table: Table = EMBEDDINGS) -> Table:
    """`table` with its two embedding columns at `width`."""
    array = pl.Array(pl.Float16(), width)
    return replace(table, columns={name: (array if name.endswith("_embedding") else dtype)
                                   for name, dtype in table.columns.items()})


def frame_of(uids, image: np.ndarray, text: np.ndarray, **columns) -> pl.DataFrame:
    """The part frame of `uids` and their [n, width] embeddings (cast to float16), `columns`
    (e.g. key, clip_score) first as PUBLISHED_EMBEDDINGS orders them."""
    first = {name: pl.Series(name, values) for name, values in columns.items()}
    return pl.DataFrame({**first, "uid": pl.Series("uid", uids, pl.Int64),
                         "image_embedding": np.asarray(image, np.float16),
                         "text_embedding": np.asarray(text, np.float16)})


def write_part(frame: pl.DataFrame, path: Path, table: Table = EMBEDDINGS) -> None:
    width = frame.schema["image_embedding"].shape[0]
    embeddings_table(width, table).write(frame, path)


def write_model_record(directory: Path, model: str, width: int, **more) -> None:
    write_json_atomic(Path(directory) / MODEL_RECORD, {"model": model, "width": width, **more})


def read_model_record(directory: Path) -> dict:
    path = Path(directory) / MODEL_RECORD
    if not path.is_file():
        raise EmbeddingsError(f"{path}: missing (the corpus was built without an embed section)")
    return json.loads(path.read_text(encoding="utf-8"))


def parts(directory: Path) -> list[Path]:
    found = sorted(Path(directory).glob("*.parquet"))
    if not found:
        raise EmbeddingsError(f"{directory}: no embedding parts (*.parquet)")
    return found


def matrix(frame: pl.DataFrame, column: str) -> np.ndarray:
    """A [n, width] float32 matrix of one embedding column."""
    return frame[column].to_numpy().astype(np.float32, copy=False).reshape(frame.height, -1)


def iter_parts(directory: Path, columns: Optional[list[str]] = None) -> Iterator[pl.DataFrame]:
    """Each part's frame in part order (never the whole set at once)."""
    for path in parts(directory):
        yield pl.read_parquet(path, columns=columns)


def read_all(directory: Path, column: str = "image_embedding",
             ids: tuple[str, ...] = ("uid",)) -> tuple[pl.DataFrame, np.ndarray]:
    """(id columns of every row, their [n, width] float32 matrix of `column`), parts in order."""
    frames, mats = [], []
    for frame in iter_parts(directory, [*ids, column]):
        frames.append(frame.select(ids))
        mats.append(matrix(frame, column))
    return pl.concat(frames), np.concatenate(mats)


__all__ = ["EMBEDDINGS", "PUBLISHED_EMBEDDINGS", "EmbeddingsError", "embeddings_table", "frame_of", "iter_parts",
           "matrix", "parts", "read_all", "read_model_record", "write_model_record", "write_part"]
