"""Dedup stage: the rules of ops/dedup.py over every downloaded row, one decisions file."""

from __future__ import annotations

from pathlib import Path

import polars as pl

from cnclip.corpus.manifests.schemas import DECISION_SCHEMA, DEDUP_DECISIONS
from cnclip.corpus.ops.dedup import find_duplicates
from cnclip.corpus.ops.eval_hashes import load_eval_hashes
from cnclip.corpus.recipe import Recipe
from cnclip.corpus.runtime import storage
from cnclip.corpus.runtime.commit import committed_parts
from cnclip.corpus.runtime.engine import Engine, Table
from cnclip.corpus.runtime.fingerprints import eval_listing
from cnclip.corpus.runtime.layout import BuildLayout
from cnclip.corpus.runtime.stage import Stage, StageContext
from cnclip.corpus.stages.download_attempts import has_attempts, scan_attempts
from cnclip.corpus.stages.shard import scan_accepted


def scan_dedup_input(download_dir: Path | str, hash_dir: Path | str, accepted: pl.LazyFrame) -> pl.LazyFrame:
    """Every downloaded row with its sha256, pHash and normalized caption."""
    downloads = scan_attempts(download_dir).filter(pl.col("status") == "success").select("uid", "sha256")
    if storage.is_url(hash_dir):  # one scan per committed part (an object store has no glob scan)
        hashes = pl.concat([storage.scan_parquet(p) for p in committed_parts(hash_dir, ".parquet")])
    else:
        hashes = pl.scan_parquet(Path(hash_dir) / "*.parquet")
    return downloads.join(hashes, on="uid", how="left").join(accepted.select("uid", "caption"), on="uid",
                                                               how="left")


def run_dedup_stage(recipe: Recipe, engine: Engine | None = None) -> dict:
    """`engine`: the build's, whose tables the duplicate search reads (polars frames locally)."""
    layout = BuildLayout.of(recipe)
    if not has_attempts(layout.download_dir):
        DEDUP_DECISIONS.write(pl.DataFrame(schema=DECISION_SCHEMA), layout.dedup_decisions)
        return {"dropped": {}, "eval_images": 0}
    rows = scan_dedup_input(layout.download_dir, layout.hash_dir, scan_accepted(layout, engine))
    evals = load_eval_hashes(recipe.dedup.eval_images, recipe.image)
    decisions = find_duplicates(rows, recipe.dedup, evals)
    DEDUP_DECISIONS.write(decisions, layout.dedup_decisions)
    counts = decisions.group_by("reason").len().sort("reason").rows()
    return {"dropped": dict(counts), "eval_images": evals.height}


# Rows dropped as duplicates, with their download's sizes; `duplicate_of` names the kept
# sample's key, or the evaluation image the row overlaps.
_DROPPED = """
SELECT a.*, t.width, t.height, t.original_width, t.original_height, t.sha256, 'dedup' AS stage,
       d.reason, d.detail, d.duplicate_of_uid, COALESCE(k.duplicate_of, d.duplicate_of_eval) AS duplicate_of
FROM accepted a
JOIN attempts t ON a.uid = t.uid
JOIN decisions d ON a.uid = d.uid
LEFT JOIN keys k ON d.duplicate_of_uid = k.duplicate_of_uid
"""


class DedupStage(Stage):
    """Downloads + hashes + accepted captions -> one decisions file; covers the dedup settings
    and every evaluation file (folders listed recursively)."""

    name = "dedup"
    needs = ("text", "download", "hash")
    sections = ("dedup",)

    def extra(self, recipe: Recipe) -> list:
        return [eval_listing(recipe.dedup.eval_images)]

    def outputs(self, layout: BuildLayout) -> tuple:
        return (layout.dedup_dir,)

    def run(self, context: StageContext) -> dict:
        return run_dedup_stage(context.recipe, context.engine)

    def report(self, summary: dict) -> str:
        return f"dedup: dropped {summary['dropped'] or 'nothing'}"

    def rejects(self, layout: BuildLayout, engine: Engine, tables: dict[str, Table]) -> list[tuple[str, Table]]:
        if tables["attempts"] is None:  # nothing downloaded: nothing to drop (and no decisions read)
            return [("dedup.parquet", engine.scan([], {"uid": pl.Int64}))]
        dropped = engine.sql(_DROPPED, accepted=tables["accepted"], attempts=tables["attempts"],
                             decisions=engine.scan([layout.dedup_decisions]), keys=tables["keys"])
        return [("dedup.parquet", dropped)]
