"""Embed stage: image and caption embeddings of every sample dedup kept, with the recipe's local
model, then the steps that read them: the CLIP-score filter and semantic dedup.

Only in builds whose recipe has an `embed:` section (`applies`): a build without one has the
stage list, fingerprints and outputs it had before the stage existed.

- Per download part, through the engine's map (on Spark executors too): each task reads its
  part's members (tar member, uid, caption) from the members table the engine's query wrote,
  streams the images out of img2dataset's tar and writes `work/embed/<part>.parquet`
  (EMBEDDINGS: float16, keyed by uid, with each pair's clip_score). A part already written is
  kept on a rerun with the same settings; the model is loaded once per worker process.
- Then, on the whole build: the CLIP-score filter (a threshold, or a global quantile by SQL on
  the engine) and semantic dedup among the pairs the filter kept (embed_semantic.py: faiss k-means
  on a sample, then the parts' clusters and each group of clusters' duplicates as engine tasks),
  into one decisions table (`work/embed-decisions.parquet`) that the shard stage and
  rejected/ read beside dedup's. Filtering first means a group of duplicates is represented by a
  pair that passed the filter.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple, Optional

import polars as pl

from cnclip.corpus.manifests.schemas import DECISION_SCHEMA, EMBED_DECISIONS, EMBED_MEMBERS, EMBED_SCORES
from cnclip.corpus.ops.phash import iter_tar_images
from cnclip.corpus.recipe import Recipe
from cnclip.corpus.runtime import storage
from cnclip.corpus.runtime.commit import committed_parts, is_committed
from cnclip.corpus.runtime.engine import Engine, Table
from cnclip.corpus.runtime.fingerprints import eval_listing
from cnclip.corpus.runtime.layout import BuildLayout, at
from cnclip.corpus.runtime.stage import Stage, StageContext
from cnclip.corpus.runtime.state import fingerprint
from cnclip.corpus.stages.download_attempts import attempts_path, has_attempts
from cnclip.corpus.stages.shard import scan_accepted

EMBED_VERSION = "embed-v1"  # bump when what a part holds changes, so parts are recomputed

# A download part's rows dedup kept, with their member key and caption (EMBED_MEMBERS), sorted by
# part so a task reading one part's rows skips the others' row groups.
_MEMBERS = """
SELECT t.part, t.key, t.uid, a.caption FROM attempts t
JOIN accepted a ON t.uid = a.uid
LEFT ANTI JOIN dropped d ON t.uid = d.uid
WHERE t.status = 'success'
ORDER BY t.part, t.uid
"""
_PARTS = "SELECT part FROM attempts GROUP BY part ORDER BY part"

_NULLS = "CAST(NULL AS BIGINT) AS duplicate_of_uid, CAST(NULL AS STRING) AS duplicate_of_eval"
_SCORE_TEXT = "COALESCE(CAST(ROUND(CAST(clip_score AS DOUBLE), 4) AS STRING), 'missing')"
# Below the threshold: dropped, the score in detail. Compared as float32, as the scores are stored
# (Spark would otherwise widen them to double: 0.26 stored is below 0.26 written).
_BELOW_MIN = f"""
SELECT uid, 'embed:low_clip_score' AS reason, {_NULLS},
       'clip_score ' || {_SCORE_TEXT} || ' < {{min_score}}' AS detail
FROM scores WHERE clip_score IS NULL OR clip_score < CAST({{min_score}} AS REAL)
"""
# Outside the top keep_fraction of the build, ranked by score (ties: the lower uid first; a
# missing score last): a global quantile, exact, as one ranking on the engine.
_OUTSIDE_TOP = f"""
SELECT uid, 'embed:low_clip_score' AS reason, {_NULLS},
       'clip_score ' || {_SCORE_TEXT} || ' outside the top {{fraction}} (rank ' || CAST(rank AS STRING)
       || ' of ' || CAST(n AS STRING) || ')' AS detail
FROM (
  SELECT s.uid, s.clip_score, ROW_NUMBER() OVER (ORDER BY COALESCE(s.clip_score, -2.0) DESC, s.uid) AS rank, c.n
  FROM scores s CROSS JOIN (SELECT COUNT(*) AS n FROM scores) c
)
WHERE rank > CEIL(n * {{fraction}} - 0.000001)
"""


class EmbedTask(NamedTuple):
    """One download part's work; its members are read by the task, not shipped by the driver."""

    tar: Path | str
    members: Path | str
    out: Path | str
    scores: Path | str  # the part's clip_score alone (EMBED_SCORES), written before `out`
    part: int
    model: str
    architecture: Optional[str]
    device: str
    batch_size: int
    version: str  # the model files' fingerprint: a worker reloads a model rewritten since it loaded it


_ENCODERS: dict = {}  # (model, architecture, device, version) -> Encoder, one load per worker process


def _encoder(task: EmbedTask):
    from cnclip.embed.encoder import load_encoder

    key = (task.model, task.architecture, task.device, task.version)
    if key not in _ENCODERS:
        _ENCODERS.clear()  # one model in memory
        _ENCODERS[key] = load_encoder(task.model, task.device, task.architecture)
    return _ENCODERS[key]


def _pixels(encoder, data: bytes):
    import io

    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        return encoder.transform(image.convert("RGB"))


def _encode_tar(task: EmbedTask, encoder, wanted: dict[str, int]) -> tuple[list[int], list]:
    """(uids, image embedding batches) of the part's wanted members, in tar order, streamed: one
    batch of image bytes in memory, decoded and preprocessed by a few threads (PIL's decoders and
    torch's ops release the GIL) while the model runs on the previous batch."""
    import os
    from concurrent.futures import ThreadPoolExecutor

    import torch

    uids, batches, pending, chunk = [], [], None, []

    def submit(pool):  # the next batch starts decoding, then the model takes the one before
        nonlocal pending
        decoding = pool.map(lambda data: _pixels(encoder, data), list(chunk)) if chunk else None
        chunk.clear()
        if pending is not None:
            batches.append(encoder.encode_pixels(torch.stack(list(pending))))
        pending = decoding

    with ThreadPoolExecutor(max(1, min(4, (os.cpu_count() or 1)))) as pool, storage.open_file(task.tar) as stream:
        for key, data in iter_tar_images(stream):
            if key in wanted:
                chunk.append(data)
                uids.append(wanted[key])
                if len(chunk) == task.batch_size:
                    submit(pool)
        submit(pool)
        submit(pool)
    return uids, batches


def embed_download_part(task: EmbedTask) -> dict:
    """img2dataset tar + its kept members -> embeddings part; returns the model's record."""
    import numpy as np

    from cnclip.embed import store

    encoder = _encoder(task)
    members = storage.scan_parquet(task.members).filter(pl.col("part") == task.part).collect()
    wanted = dict(zip(members["key"].to_list(), members["uid"].to_list(), strict=True))
    uids, batches = _encode_tar(task, encoder, wanted) if wanted else ([], [])
    caption_of = dict(zip(members["uid"].to_list(), members["caption"].to_list(), strict=True))
    width = encoder.dim
    image = np.concatenate(batches) if batches else np.zeros((0, width), np.float32)
    text = encoder.encode_texts([caption_of[uid] for uid in uids], task.batch_size) if uids else image.copy()
    score = (image * text).sum(axis=1).astype(np.float32)  # the cosine of unit rows, before float16
    frame = store.frame_of(uids, image, text).with_columns(pl.Series("clip_score", score, pl.Float32)).sort("uid")
    EMBED_SCORES.write(frame.select("uid", "clip_score"), task.scores)  # first: `out` marks the part done
    store.write_part(frame, task.out)
    return {"model": encoder.name, "width": width, "precision": encoder.precision, "images": len(uids)}


def _tasks(recipe: Recipe, engine: Engine, layout: BuildLayout) -> list[EmbedTask]:
    settings = recipe.embed
    attempts = engine.scan([attempts_path(layout.download_dir)])
    parts = [part for (part,) in engine.rows(engine.sql(_PARTS, attempts=attempts))]
    version = fingerprint(model_listing(recipe))
    return [EmbedTask(at(layout.download_dir, f"{part:05d}.tar"), layout.embed_members,
                      at(layout.embed_dir, f"{part:05d}.parquet"), at(layout.embed_scores_dir, f"{part:05d}.parquet"),
                      part, settings.model, settings.architecture,
                      settings.device, settings.batch_size, version) for part in parts]


def model_listing(recipe: Recipe) -> list:
    """Every file of the embed model with its size and version (a folder's recursively)."""
    return eval_listing([recipe.embed.model.removeprefix("local-dir:")])


def _write_model_record(recipe: Recipe, layout: BuildLayout, results: list[dict]) -> dict:
    """model.json beside the parts: from the tasks' results, or (nothing left to embed) the one a
    previous run wrote, or the model loaded here to read its name and width."""
    from cnclip.embed import store
    from cnclip.embed.encoder import load_encoder

    if results:
        record = {k: results[0][k] for k in ("model", "width", "precision")}
    elif storage.exists(at(layout.embed_dir, store.MODEL_RECORD)):
        return store.read_model_record(Path(storage.local_path(layout.embed_dir)))
    else:
        encoder = load_encoder(recipe.embed.model, recipe.embed.device, recipe.embed.architecture)
        record = {"model": encoder.name, "width": encoder.dim, "precision": encoder.precision}
    # `model` is the path as the recipe gives it (what search and `--model` load again); what
    # loaded it is beside it.
    record["loaded_as"] = record.pop("model")
    store.write_model_record(Path(storage.local_path(layout.embed_dir)), recipe.embed.model, record.pop("width"),
                             **record)
    return store.read_model_record(Path(storage.local_path(layout.embed_dir)))


def decide(recipe: Recipe, engine: Engine, layout: BuildLayout) -> dict[str, int]:
    """The CLIP-score filter, then semantic dedup among what it kept, into the decisions table;
    returns the count per reason."""
    scores = engine.scan(committed_parts(layout.embed_scores_dir, ".parquet"), EMBED_SCORES.columns)
    rule = recipe.filter.clip_score
    if rule is None:
        decisions = engine.scan([], DECISION_SCHEMA)
    elif rule.min_score is not None:
        decisions = engine.sql(_BELOW_MIN.format(min_score=float(rule.min_score)), scores=scores)
    else:
        decisions = engine.sql(_OUTSIDE_TOP.format(fraction=float(rule.keep_fraction)), scores=scores)
    engine.write(decisions, layout.embed_decisions, EMBED_DECISIONS)
    if recipe.dedup.semantic is not None:
        from cnclip.corpus.stages.embed_semantic import add_semantic_duplicates

        add_semantic_duplicates(recipe, engine, layout)
    counts = storage.scan_parquet(layout.embed_decisions).group_by("reason").len().sort("reason").collect().rows()
    return dict(counts)


def run_embed_stage(recipe: Recipe, engine: Engine) -> dict:
    """Embed every kept sample not embedded yet, write model.json, then the decisions."""
    layout = BuildLayout.of(recipe)
    storage.make_dirs(layout.embed_dir)
    storage.make_dirs(layout.embed_scores_dir)
    if not has_attempts(layout.download_dir):
        EMBED_DECISIONS.write(pl.DataFrame(schema=DECISION_SCHEMA), layout.embed_decisions)
        return {"parts": 0, "embedded": 0, "dropped": {}}
    tasks = _tasks(recipe, engine, layout)
    todo = [t for t in tasks if not is_committed(t.out)]
    if todo:
        attempts = engine.scan([attempts_path(layout.download_dir)])
        engine.write(engine.sql(_MEMBERS, attempts=attempts, accepted=scan_accepted(layout, engine),
                                dropped=engine.scan([layout.dedup_decisions])), layout.embed_members, EMBED_MEMBERS)
    results = engine.map_parts(embed_download_part, todo, "embed: image and text embeddings",
                               recipe.embed.processes or 1)
    record = _write_model_record(recipe, layout, results)
    embedded = storage.scan_parquet(committed_parts(layout.embed_dir, ".parquet")).select(pl.len()).collect().item()
    return {"parts": len(tasks), "embedded": embedded, "model": record["model"],
            "dropped": decide(recipe, engine, layout)}


# Rows the embed stage dropped, with their download's sizes; semantic duplicates are counted with
# the other duplicates (stage dedup), `duplicate_of` naming the kept sample's key.
_DROPPED = """
SELECT a.*, t.width, t.height, t.original_width, t.original_height, t.sha256,
       CASE WHEN d.reason LIKE 'dedup:%' THEN 'dedup' ELSE 'embed' END AS stage,
       d.reason, d.detail, d.duplicate_of_uid, k.duplicate_of
FROM accepted a
JOIN attempts t ON a.uid = t.uid
JOIN decisions d ON a.uid = d.uid
LEFT JOIN keys k ON d.duplicate_of_uid = k.duplicate_of_uid
"""


class EmbedStage(Stage):
    """Kept samples -> embeddings parts + model.json + decisions; covers the embed and filter
    sections, dedup.semantic and the model's files (a retrained checkpoint redoes the stage)."""

    name = "embed"
    needs = ("text", "download", "hash", "dedup")
    sections = ("embed", "filter")
    only_with = "embed"

    def extra(self, recipe: Recipe) -> list:
        semantic = recipe.dedup.semantic
        # without None values: a recipe that leaves `sample` out keeps the fingerprint it had before the key
        semantic = semantic.model_dump(mode="json", exclude_none=True) if semantic else None
        return [EMBED_VERSION, semantic, model_listing(recipe)]

    def outputs(self, layout: BuildLayout) -> tuple:
        return (layout.embed_dir, layout.embed_scores_dir, layout.embed_members, layout.embed_decisions,
                layout.embed_semantic_dir)

    def run(self, context: StageContext) -> dict:
        return run_embed_stage(context.recipe, context.engine)

    def report(self, summary: dict) -> str:
        return f"embed: {summary['embedded']} samples embedded; dropped {summary['dropped'] or 'nothing'}"

    def rejects(self, layout: BuildLayout, engine: Engine, tables: dict[str, Table]) -> list[tuple[str, Table]]:
        if tables["attempts"] is None:
            return [("embed.parquet", engine.scan([], {"uid": pl.Int64}))]
        dropped = engine.sql(_DROPPED, accepted=tables["accepted"], attempts=tables["attempts"],
                             decisions=engine.scan([layout.embed_decisions]), keys=tables["keys"])
        return [("embed.parquet", dropped)]
