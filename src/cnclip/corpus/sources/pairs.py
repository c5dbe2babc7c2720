"""The Parquet file a crawl source writes: one row per (image URL, caption) found on a page.

Ingest reads it like a metadata file: `url`, `caption_raw`, then `page_url` and `alt_source`
(`alt` or `title`) as extra columns.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import polars as pl

from cnclip.corpus.manifests.schemas import CRAWL_PAIRS

PAIR_SCHEMA = CRAWL_PAIRS.columns


def write_pairs(rows: Iterable[tuple[str, str, str, str]], out_path: str | Path) -> int:
    """Write (url, caption_raw, page_url, alt_source) rows atomically; returns the row count."""
    frame = pl.DataFrame(list(rows), schema=PAIR_SCHEMA, orient="row")
    CRAWL_PAIRS.write(frame, Path(out_path))
    return frame.height
