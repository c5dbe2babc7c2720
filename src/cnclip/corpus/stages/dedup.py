"""Dedup stage: the rules of ops/dedup.py over every downloaded row, one decisions file.

A dataset source with several captions per image (coco, cn_clip and its presets) gives one row
per caption, all with the same image URL: those rows are one image, not copies of it. The rules
see only the first row of such an image (lowest uid); the others share its fate (kept with it,
or dropped with its reason and the row or evaluation image it duplicates).
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from cnclip._common.console import summary_table
from cnclip.corpus.manifests.schemas import DECISION_SCHEMA, DEDUP_DECISIONS, HASHES
from cnclip.corpus.ops.eval_hashes import load_eval_hashes
from cnclip.corpus.recipe import DedupSettings, Recipe
from cnclip.corpus.runtime import storage
from cnclip.corpus.runtime.commit import committed_parts
from cnclip.corpus.runtime.engine import Engine, FindsDuplicates, Table, default_engine
from cnclip.corpus.runtime.fingerprints import eval_listing
from cnclip.corpus.runtime.layout import BuildLayout, at
from cnclip.corpus.runtime.stage import Stage, StageContext
from cnclip.corpus.stages.download_attempts import attempts_path, has_attempts, scan_attempts
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


# scan_dedup_input in SQL, for an engine that runs the dedup rules on its own tables.
_DEDUP_INPUT = """
SELECT t.uid, t.sha256, h.phash, a.caption FROM attempts t
LEFT JOIN hashes h ON t.uid = h.uid
LEFT JOIN accepted a ON t.uid = a.uid
WHERE t.status = 'success'
"""


# The rows of a several-captions source after the first of their image (same source, same URL),
# each with that first row (`first_uid`).
_SAME_IMAGE = """
SELECT a.uid, f.first_uid FROM accepted a
JOIN (SELECT source, url, MIN(uid) AS first_uid FROM accepted WHERE source IN ({names}) GROUP BY source, url) f
  ON a.source = f.source AND a.url = f.url
WHERE a.uid <> f.first_uid
"""
_SHARED_FATE = """
SELECT * FROM decisions
UNION ALL
SELECT s.uid, d.reason, d.duplicate_of_uid, d.duplicate_of_eval, d.detail
FROM same s JOIN decisions d ON s.first_uid = d.uid
"""


def _same_image_rows(recipe: Recipe, layout: BuildLayout, engine: Engine) -> Table | None:
    """(uid, first_uid) of the rows that repeat an earlier row's image in a several-captions
    source; None when the recipe has no such source."""
    names = [s.name for s in recipe.sources if getattr(s, "several_captions", False)]
    if not names:
        return None
    quoted = ", ".join("'" + name.replace("'", "''") + "'" for name in names)
    return engine.sql(_SAME_IMAGE.format(names=quoted), accepted=scan_accepted(layout, engine))


def _engine_decisions(layout: BuildLayout, engine: FindsDuplicates, settings: DedupSettings,
                      evals: pl.DataFrame, same: Table | None) -> list:
    """The dedup rules run by the engine on its own tables (no step on one machine); returns the
    (reason, count) rows of the decisions written."""
    rows = engine.sql(_DEDUP_INPUT, attempts=engine.scan([attempts_path(layout.download_dir)]),
                      hashes=engine.scan(committed_parts(layout.hash_dir, ".parquet"), HASHES.columns),
                      accepted=scan_accepted(layout, engine))
    if same is None:
        engine.write(engine.find_duplicates(rows, settings, evals), layout.dedup_decisions, DEDUP_DECISIONS)
    else:
        rows = engine.sql("SELECT r.* FROM rows r LEFT ANTI JOIN same s ON r.uid = s.uid", rows=rows, same=same)
        firsts = at(layout.dedup_dir, "first-rows.parquet")
        engine.write(engine.find_duplicates(rows, settings, evals), firsts, DEDUP_DECISIONS)
        engine.write(engine.sql(_SHARED_FATE, decisions=engine.scan([firsts]), same=same), layout.dedup_decisions,
                     DEDUP_DECISIONS)
    return engine.rows(engine.sql("SELECT reason, COUNT(*) FROM decisions GROUP BY reason ORDER BY reason",
                                  decisions=engine.scan([layout.dedup_decisions])))


def run_dedup_stage(recipe: Recipe, engine: Engine | None = None) -> dict:
    """`engine`: the build's. One that finds duplicates itself (FindsDuplicates: Spark) runs the
    rules on its tables; otherwise the array form of ops/dedup.py runs over polars frames."""
    layout = BuildLayout.of(recipe)
    if not has_attempts(layout.download_dir):
        DEDUP_DECISIONS.write(pl.DataFrame(schema=DECISION_SCHEMA), layout.dedup_decisions)
        return {"dropped": {}, "eval_images": 0}
    evals = load_eval_hashes(recipe.dedup.eval_images, recipe.image)
    same = _same_image_rows(recipe, layout, engine or default_engine())
    if isinstance(engine, FindsDuplicates):
        return {"dropped": dict(_engine_decisions(layout, engine, recipe.dedup, evals, same)),
                "eval_images": evals.height}
    from cnclip.corpus.ops.dedup import find_duplicates  # numba's kernels: only where the arrays run

    rows = scan_dedup_input(layout.download_dir, layout.hash_dir, scan_accepted(layout, engine))
    if same is not None:
        same = same.collect() if isinstance(same, pl.LazyFrame) else same
        rows = rows.join(same.lazy().select("uid"), on="uid", how="anti")
    decisions = find_duplicates(rows, recipe.dedup, evals)
    if same is not None:
        shared = same.join(decisions.rename({"uid": "first_uid"}), on="first_uid").select(DECISION_SCHEMA.keys())
        decisions = pl.concat([decisions, shared.cast(DECISION_SCHEMA)]).sort("uid")
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

    def covers(self, recipe: Recipe) -> list:
        """dedup.semantic is left out: the embed stage runs it, and its fingerprint covers it."""
        settings = {k: v for k, v in recipe.settings("dedup").items() if k != "semantic"}
        return [settings, *self.extra(recipe)]

    def extra(self, recipe: Recipe) -> list:
        return [eval_listing(recipe.dedup.eval_images)]

    def outputs(self, layout: BuildLayout) -> tuple:
        return (layout.dedup_dir,)

    def run(self, context: StageContext) -> dict:
        return run_dedup_stage(context.recipe, context.engine)

    def report(self, summary: dict):
        if not summary["dropped"]:
            return "dedup: dropped nothing"
        return summary_table(f"dedup: {sum(summary['dropped'].values())} rows dropped", summary["dropped"].items(),
                             ("reason", "rows"))

    def rejects(self, layout: BuildLayout, engine: Engine, tables: dict[str, Table]) -> list[tuple[str, Table]]:
        if tables["attempts"] is None:  # nothing downloaded: nothing to drop (and no decisions read)
            return [("dedup.parquet", engine.scan([], {"uid": pl.Int64}))]
        dropped = engine.sql(_DROPPED, accepted=tables["accepted"], attempts=tables["attempts"],
                             decisions=engine.scan([layout.dedup_decisions]), keys=tables["keys"])
        return [("dedup.parquet", dropped)]
