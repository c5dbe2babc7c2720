"""Dedup stage: the rules of ops/dedup.py over every downloaded row, one decisions file."""

from __future__ import annotations

from pathlib import Path

import polars as pl

from cnclip.corpus.ops.dedup import DECISION_SCHEMA, find_duplicates
from cnclip.corpus.ops.eval_hashes import load_eval_hashes
from cnclip.corpus.recipe import Recipe
from cnclip.corpus.runtime.layout import BuildLayout
from cnclip.corpus.runtime.state import write_parquet_atomic
from cnclip.corpus.stages.download_attempts import has_attempts, scan_attempts
from cnclip.corpus.stages.shard import scan_accepted


def scan_dedup_input(download_dir: Path, hash_dir: Path, accepted: pl.LazyFrame) -> pl.LazyFrame:
    """Every downloaded row with its sha256, pHash and normalized caption."""
    downloads = scan_attempts(download_dir).filter(pl.col("status") == "success").select("uid", "sha256")
    hashes = pl.scan_parquet(hash_dir / "*.parquet")
    return downloads.join(hashes, on="uid", how="left").join(accepted.select("uid", "caption"), on="uid",
                                                               how="left")


def run_dedup_stage(recipe: Recipe) -> dict:
    layout = BuildLayout.of(recipe)
    if not has_attempts(layout.download_dir):
        write_parquet_atomic(pl.DataFrame(schema=DECISION_SCHEMA), layout.dedup_decisions)
        return {"dropped": {}, "eval_images": 0}
    rows = scan_dedup_input(layout.download_dir, layout.hash_dir, scan_accepted(layout))
    evals = load_eval_hashes(recipe.dedup.eval_images, recipe.image)
    decisions = find_duplicates(rows, recipe.dedup, evals)
    write_parquet_atomic(decisions, layout.dedup_decisions)
    counts = decisions.group_by("reason").len().sort("reason").rows()
    return {"dropped": dict(counts), "eval_images": evals.height}
