"""The translation cache: a folder of Parquet parts (TRANSLATE_CACHE), one row per (backend, model
identity, English caption) and its translation (null: the backend gave none, remembered too, so a
rerun does not ask again; remove the cache folder to ask again).

Parts are only ever added, each written whole (renamed into place) and named by its key and its
captions' digest, so builds sharing one cache folder never overwrite each other's rows with other
rows, and an interrupted run keeps every part it finished.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import polars as pl

from cnclip.corpus.manifests.schemas import TRANSLATE_CACHE
from cnclip.corpus.runtime import storage
from cnclip.corpus.runtime.commit import committed_parts
from cnclip.corpus.runtime.layout import at
from cnclip.corpus.runtime.state import fingerprint

_EMPTY = {"text": pl.String, "translation": pl.String}


def cached(cache_dir: Path | str, backend: str, model: str) -> pl.LazyFrame:
    """text -> translation for this backend and model, one row per text (a translation before a
    null, should two builds have raced on one caption)."""
    parts = committed_parts(cache_dir, ".parquet")
    if not parts:
        return pl.LazyFrame(schema=_EMPTY)
    rows = storage.scan_parquet(parts).filter((pl.col("backend") == backend) & (pl.col("model") == model))
    return (rows.select("text", "translation").sort("text", pl.col("translation").is_null())
            .unique("text", keep="first", maintain_order=True))


def add(cache_dir: Path | str, backend: str, model: str, texts: Sequence[str],
        translations: Sequence[Optional[str]]) -> Path | str:
    """One new cache part with these rows (an empty translation counts as none); returns its path."""
    frame = pl.DataFrame({"text": list(texts), "translation": list(translations)}, schema=_EMPTY).with_columns(
        pl.when(pl.col("translation").str.strip_chars() == "").then(None).otherwise(pl.col("translation"))
        .alias("translation"))
    frame = frame.select(pl.lit(backend).alias("backend"), pl.lit(model).alias("model"), "text", "translation")
    path = at(cache_dir, f"{model[:16]}-{fingerprint(list(texts))}.parquet")
    TRANSLATE_CACHE.write(frame, path)
    return path
