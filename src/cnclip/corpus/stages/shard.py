"""Shard stage: final WebDataset tars, the samples/ and rejected/ manifests, sizes.json, and
checksums.json recording every one of them (integrity.py).

Samples are ordered by uid (source order, then row order) whatever order img2dataset's threads
finished in, so the same inputs give the same keys and the same tar bytes. Each output shard is
written by its own task, reading image bytes straight out of img2dataset's tars by the member the
attempts table names (download_attempts.py); a tar
and its manifest part are renamed into place when whole (on a URL work_dir: committed by their
markers, commit.py), so an interrupted stage resumes after the last complete shard.
"""

from __future__ import annotations

import json
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import polars as pl
import webdataset as wds

from cnclip._common.atomic import write_json_atomic
from cnclip._common.console import info, warn
from cnclip.corpus.manifests import schemas
from cnclip.corpus.manifests.funnel import write_funnel
from cnclip.corpus.manifests.integrity import damaged_files, read_checksums, unexpected_files, write_checksums
from cnclip.corpus.manifests.schemas import REJECTED, SAMPLE_SCHEMA, SAMPLES, SHARD_PLAN, conform, keep_column_types
from cnclip.corpus.ops.phash import hex_digits
from cnclip.corpus.recipe import Recipe
from cnclip.corpus.runtime import storage
from cnclip.corpus.runtime.commit import committed_parts, committed_path, discard_uncommitted, is_committed, write_part
from cnclip.corpus.runtime.engine import Engine, Table, default_engine, make_engine
from cnclip.corpus.runtime.layout import BuildLayout, at
from cnclip.corpus.runtime.stage import Stage, StageContext
from cnclip.corpus.runtime.state import StageState
from cnclip.corpus.stages.download_attempts import attempts_path, has_attempts

# Fixed tar member times make shards byte-identical across rebuilds.
TAR_MTIME = 0


_ACCEPTED_SCHEMA = {"uid": pl.Int64, "source": pl.String, "row": pl.Int64, "url": pl.String,
                    "caption_raw": pl.String, "caption": pl.String}


def scan_accepted(layout: BuildLayout, engine: Engine | None = None) -> Table:
    """The text stage's accepted rows, every source's keep columns included."""
    engine = engine or default_engine()
    return engine.scan(committed_parts(layout.text_accepted_dir, ".parquet"), _ACCEPTED_SCHEMA)


def _has_downloads(layout: BuildLayout) -> bool:
    return has_attempts(layout.download_dir)


def _attempts(layout: BuildLayout, engine: Engine) -> Table | None:
    """The download stage's attempts table (None before any download part exists)."""
    return engine.scan([attempts_path(layout.download_dir)]) if _has_downloads(layout) else None


# The kept rows' positions in uid order (source order, then row order), from per-bucket counts:
# a bucket is a range of 2^20 uids, numbered within itself, its first position the count of kept
# rows in the buckets before it. One ROW_NUMBER() over every row would be one partition on
# Spark; per bucket, the numbering spreads over the cluster and gives the same positions.
_BUCKETED = """
SELECT a.uid, CAST(FLOOR(a.uid / 1048576) AS BIGINT) AS bucket
FROM accepted a
JOIN attempts t ON a.uid = t.uid
LEFT ANTI JOIN dropped d ON a.uid = d.uid
WHERE t.status = 'success'
"""
_FIRST_POSITIONS = """
SELECT bucket, SUM(kept) OVER (ORDER BY bucket) - kept AS first_position
FROM (SELECT bucket, COUNT(*) AS kept FROM bucketed GROUP BY bucket)
"""
_POSITIONS = """
SELECT uid, first_position + ROW_NUMBER() OVER (PARTITION BY bucket ORDER BY uid) - 1 AS position
FROM (SELECT b.uid, b.bucket, f.first_position FROM bucketed b JOIN firsts f ON b.bucket = f.bucket)
"""
# The kept rows numbered into shards and keys: shard `s`, position `p` within it -> key
# zfill(s, 5) + zfill(p, digits). (LPAD cuts a longer string to the width, so shard numbers of 6
# digits and more are taken as they are.)
_PLAN = """
SELECT *, CASE WHEN shard < 100000 THEN LPAD(CAST(shard AS STRING), 5, '0') ELSE CAST(shard AS STRING) END
          || LPAD(CAST(position % {per_shard} AS STRING), {digits}, '0') AS key
FROM (
  SELECT *, CAST(FLOOR(position / {per_shard}) AS BIGINT) AS shard
  FROM (
    SELECT a.*, t.key AS download_key, t.tar AS download_tar, t.width, t.height, t.original_width, t.original_height,
           t.sha256, h.phash, CAST(p.position AS BIGINT) AS position{score}
    FROM accepted a
    JOIN attempts t ON a.uid = t.uid
    JOIN positions p ON a.uid = p.uid
    LEFT JOIN hashes h ON a.uid = h.uid{score_join}
  )
)
ORDER BY uid
"""


def kept_positions(engine: Engine, accepted: Table, attempts: Table, dropped: Table) -> Table:
    """uid, position: each downloaded row dedup kept, numbered from 0 in uid order."""
    bucketed = engine.sql(_BUCKETED, accepted=accepted, attempts=attempts, dropped=dropped)
    return engine.sql(_POSITIONS, bucketed=bucketed, firsts=engine.sql(_FIRST_POSITIONS, bucketed=bucketed))


def _dropped(recipe: Recipe, layout: BuildLayout, engine: Engine) -> Table:
    """The uids dedup dropped, and those the embed stage dropped in a build that has one."""
    dedup = engine.scan([layout.dedup_decisions])
    if recipe.embed is None:
        return dedup
    return engine.sql("SELECT uid FROM dedup UNION ALL SELECT uid FROM embed", dedup=dedup,
                      embed=engine.scan([layout.embed_decisions]))


def plan_shards(recipe: Recipe, engine: Engine | None = None) -> int:
    """Assign every kept sample its final shard and key (and, with an embed section, its
    clip_score); returns the number of samples."""
    engine = engine or default_engine()
    layout = BuildLayout.of(recipe)
    per_shard = recipe.shard.samples_per_shard
    accepted, attempts = scan_accepted(layout, engine), _attempts(layout, engine)
    positions = kept_positions(engine, accepted, attempts, _dropped(recipe, layout, engine))
    scored = recipe.embed is not None
    tables = {"scores": engine.scan(committed_parts(layout.embed_scores_dir, ".parquet"),
                                    {"uid": pl.Int64, "clip_score": pl.Float32})} if scored else {}
    plan = engine.sql(
        _PLAN.format(per_shard=int(per_shard), digits=len(str(per_shard - 1)),
                     score=", s.clip_score" if scored else "",
                     score_join=" LEFT JOIN scores s ON a.uid = s.uid" if scored else ""),
        accepted=accepted,
        attempts=attempts,
        positions=positions,
        hashes=engine.scan(committed_parts(layout.hash_dir, ".parquet"), {"uid": pl.Int64, "phash": pl.UInt64}),
        **tables,
    )
    engine.write(plan, layout.shard_plan, SHARD_PLAN)
    return engine.rows(engine.sql("SELECT COUNT(*) FROM plan", plan=engine.scan([layout.shard_plan])))[0][0]


@dataclass(frozen=True)
class _ShardTask:
    plan: Path | str  # local paths, or the URLs of a URL work_dir (runtime/storage.py)
    shard: int
    shards_dir: Path | str
    samples_dir: Path | str
    download_dir: Path | str  # the plan's download_tar is relative to it
    image_extension: str
    keep_columns: dict  # name -> polars type, every source's (manifests/schemas.py)
    embed_dir: Path | str | None = None  # a build with an embed section: its work parts, published per shard
    embeddings_dir: Path | str | None = None
    translated: bool = False  # a build with a translate section: samples/ carry caption_en

    @property
    def embeddings_path(self) -> Path | str | None:
        return None if self.embeddings_dir is None else at(self.embeddings_dir, f"{self.shard:05d}.parquet")

    @property
    def tar_path(self) -> Path | str:
        return at(self.shards_dir, f"{self.shard:05d}.tar")

    @property
    def manifest_path(self) -> Path | str:
        return at(self.samples_dir, f"{self.shard:05d}.parquet")


def _open_tar(path: Path | str, streams: list) -> tarfile.TarFile:
    """A download tar for random access: by path locally, through its (seekable) fsspec file on a URL."""
    if not storage.is_url(path):
        return tarfile.open(path)
    streams.append(storage.open_file(path))
    return tarfile.open(fileobj=streams[-1])


def write_shard(task: _ShardTask) -> int:
    """One output tar and its manifest part, each written under a temporary name then renamed
    (or, on a URL, committed by its marker)."""
    rows = (storage.scan_parquet(task.plan).filter(pl.col("shard") == task.shard)
            .with_columns(hex_digits(pl.col("phash")).alias("phash")).collect())
    base = SAMPLE_SCHEMA if task.embed_dir is None else {**SAMPLE_SCHEMA, "clip_score": pl.Float32()}
    if task.translated:
        base = {**base, **schemas.CAPTION_EN}
    published = conform(rows, base, task.keep_columns)
    sources: dict[str, tarfile.TarFile] = {}
    streams: list = []
    try:
        with committed_path(task.tar_path) as tmp:
            with open(tmp, "wb") as stream, wds.TarWriter(stream, mtime=TAR_MTIME) as writer:
                sources_of = rows.select("download_tar", "download_key").iter_rows()
                for (download_tar, download_key), metadata in zip(sources_of, published.iter_rows(named=True),
                                                                  strict=True):
                    tar = sources.get(download_tar)
                    if tar is None:
                        tar = sources[download_tar] = _open_tar(at(task.download_dir, download_tar), streams)
                    member = tar.extractfile(f"{download_key}.{task.image_extension}")
                    writer.write(
                        {
                            "__key__": metadata["key"],
                            task.image_extension: member.read(),
                            "txt": metadata["caption"],
                            "json": json.dumps(metadata, ensure_ascii=False, default=str).encode("utf-8"),
                        }
                    )
            # The manifest goes in first: a shard counts as done only when its tar is in place too.
            if task.embed_dir is not None:
                publish_embeddings(task, rows)
            SAMPLES.write(published, task.manifest_path)
    finally:
        for tar in sources.values():
            tar.close()
        for stream in streams:
            stream.close()
    return rows.height


def publish_embeddings(task: _ShardTask, rows: pl.DataFrame) -> None:
    """The shard's rows' embeddings (PUBLISHED_EMBEDDINGS, in samples/ order), read from the work
    parts of the download parts the shard's images came from."""
    from cnclip.embed import store

    parts = [at(task.embed_dir, name.removesuffix(".tar") + ".parquet")
             for name in rows["download_tar"].unique().sort().to_list()]
    keys = rows.select("key", "uid")
    found = (storage.scan_parquet(parts).join(keys.lazy(), on="uid", how="inner") if parts else
             pl.LazyFrame(schema={"uid": pl.Int64, "key": pl.String}))
    frame = keys.join(found.collect(), on="uid", how="left", maintain_order="left").select(
        "key", "uid", "clip_score", "image_embedding", "text_embedding")
    store.write_part(frame, task.embeddings_path, store.PUBLISHED_EMBEDDINGS)


def _key_of_kept(layout: BuildLayout, engine: Engine) -> Table:
    return engine.sql("SELECT uid AS duplicate_of_uid, key AS duplicate_of FROM plan",
                      plan=engine.scan([layout.shard_plan]))


def write_rejects(layout: BuildLayout, keep_columns: dict, engine: Engine | None = None,
                  stages: Sequence[Stage] | None = None, optional_columns: dict | None = None) -> list[Path | str]:
    """rejected/: the reject tables of every stage of the pipeline's list, in its order (text-stage
    rejects, download failures and rows img2dataset never reported, dedup drops); `duplicate_of`
    names the kept sample's key (or the evaluation image). Every part has the one rejected schema,
    sorted by uid; a stage's part is written even with 0 rows, so the folder is never empty.
    `optional_columns`: the rejected table's optional columns this build has (caption_en), before
    the keep columns."""
    engine = engine or default_engine()
    if stages is None:  # no recipe at hand: the stages every build runs
        from cnclip.corpus import pipeline

        stages = [stage for stage in pipeline.STAGES if stage.only_with is None]
    tables = {
        "accepted": scan_accepted(layout, engine),
        "keys": _key_of_kept(layout, engine),
        "attempts": _attempts(layout, engine),
    }
    schema = REJECTED.with_keep_columns({**(optional_columns or {}), **keep_columns})
    written = []
    for stage in stages:
        for name, table in stage.rejects(layout, engine, tables):
            written.append(at(layout.rejected_dir, name))
            engine.write(engine.sql("SELECT * FROM rejects ORDER BY uid", rejects=table), written[-1], schema)
    return written


def run_shard_stage(recipe: Recipe, engine: Engine | None = None, stages: Sequence[Stage] | None = None) -> dict:
    """Plan, write every shard not yet written, the rejects and sizes.json; returns the funnel.
    `stages`: the pipeline's list (whose rejects and funnel rows are written)."""
    engine = engine or make_engine(recipe.engine)
    if stages is None:
        from cnclip.corpus import pipeline
        from cnclip.corpus.runtime.stage import applicable

        stages = applicable(recipe, pipeline.STAGES)
    layout = BuildLayout.of(recipe)
    for folder in (layout.shards_dir, layout.samples_dir, layout.rejected_dir):
        storage.make_dirs(folder)
        discard_uncommitted(folder)
    total = 0
    if _has_downloads(layout):
        # The plan is deterministic; one left by an interrupted run of this stage is whole.
        total = (storage.scan_parquet(layout.shard_plan).select(pl.len()).collect().item()
                 if is_committed(layout.shard_plan) else plan_shards(recipe, engine))
    else:
        SHARD_PLAN.write(pl.DataFrame(schema=SHARD_PLAN.columns), layout.shard_plan)
    count = -(-total // recipe.shard.samples_per_shard)
    keep_columns = keep_column_types(layout.ingest_dir)
    embedded = {} if recipe.embed is None else {"embed_dir": layout.embed_dir, "embeddings_dir": layout.embeddings_dir}
    if embedded:
        storage.make_dirs(layout.embeddings_dir)
        discard_uncommitted(layout.embeddings_dir)
    tasks = [
        _ShardTask(layout.shard_plan, shard, layout.shards_dir, layout.samples_dir, layout.download_dir,
                   recipe.image.encode_format,
                   keep_columns, **embedded, translated=recipe.translate is not None)
        for shard in range(count)
    ]
    todo = [t for t in tasks if not (is_committed(t.tar_path) and is_committed(t.manifest_path)
                                     and (t.embeddings_path is None or is_committed(t.embeddings_path)))]
    engine.map_parts(write_shard, todo, "shard: write tars", recipe.shard.processes)
    rejects = write_rejects(layout, keep_columns, engine, stages,
                            schemas.CAPTION_EN if recipe.translate is not None else None)
    # The per-shard sample counts open_clip_train reads for --train-num-samples.
    sizes = {
        Path(t.tar_path).name: storage.scan_parquet(t.manifest_path).select(pl.len()).collect().item() for t in tasks
    }
    sizes_path = at(layout.shards_dir, "sizes.json")
    if storage.is_url(sizes_path):  # committed like every published part
        write_part(sizes_path, json.dumps(sizes, ensure_ascii=False, indent=2).encode("utf-8"))
    else:
        write_json_atomic(sizes_path, sizes)
    funnel = write_funnel(layout, recipe.name, [s.name for s in stages if s.in_funnel], engine)
    published = [t.tar_path for t in tasks] + [sizes_path]
    published += [t.manifest_path for t in tasks] + rejects + [layout.funnel_path]
    if embedded:
        published += [t.embeddings_path for t in tasks] + [_publish_model_record(layout)]
    write_checksums(layout.manifest_dir, layout.shards_dir, published, recipe.shard.processes, engine)
    return funnel


def _publish_model_record(layout: BuildLayout) -> Path | str:
    """embeddings/model.json: the embed stage's record of the model, as it wrote it."""
    from cnclip.embed.store import MODEL_RECORD

    path = at(layout.embeddings_dir, MODEL_RECORD)
    text = storage.read_text(at(layout.embed_dir, MODEL_RECORD))
    if storage.is_url(path):
        write_part(path, text.encode("utf-8"))
    else:
        write_json_atomic(path, json.loads(text))
    return path


def reopen_if_damaged(layout: BuildLayout, state: StageState) -> None:
    """Before a finished shard stage is called up to date: a published file that is missing or
    changed is removed and the stage resumed, which rewrites just those (and the small files
    written at its end); without a checksums record the stage is redone."""
    if not state.complete:
        return
    if layout.remote:
        _redo_if_damaged_remotely(layout, state)
        return
    try:
        record = read_checksums(layout.manifest_dir)
        recorded = record["files"]
        problems, damaged = damaged_files(layout.manifest_dir, layout.shards_dir, record=record)
    except ValueError as err:
        warn(f"{err}; redoing the shard stage")
        state.discard()
        return
    for problem in unexpected_files(layout.manifest_dir, layout.shards_dir, recorded):
        warn(f"{problem}; remove it: readers would take it for part of the corpus")
    if problems:
        for problem in problems:
            warn(problem)
        info(f"shard: rewriting {len(damaged)} damaged file(s)")
        for path in damaged:
            path.unlink(missing_ok=True)
        state.reopen()


def _redo_if_damaged_remotely(layout: BuildLayout, state: StageState) -> None:
    """A finished shard stage written to URLs: every recorded object read back and hashed
    (publish.published_problems); one missing, uncommitted or changed redoes the whole stage
    (simpler than the local per-file repair, and as deterministic), one it did not write is
    reported and left."""
    from cnclip.corpus.runtime.publish import published_problems

    problems = published_problems(str(layout.manifest_dir))
    foreign = [p for p in problems if p.endswith("not recorded in checksums.json")]
    for problem in foreign:  # the user's, not the build's: left where it is, as locally
        warn(f"{problem}; remove it: readers would take it for part of the corpus")
    damaged = [p for p in problems if p not in foreign]
    if damaged:
        for problem in damaged:
            warn(problem)
        info(f"shard: redoing the shard stage for {len(damaged)} damaged object(s)")
        state.discard()


class ShardStage(Stage):
    """Plan + tars + samples/ + rejected/ + funnel.json + checksums.json; covers the shard
    settings and where the manifests go."""

    name = "shard"
    needs = ("text", "download", "hash", "dedup")
    sections = ("shard",)

    def extra(self, recipe: Recipe) -> list:
        return [str(recipe.manifest_dir)]

    def outputs(self, layout: BuildLayout) -> tuple:
        embeddings = (layout.embeddings_dir,) if layout.embeds else ()
        return (layout.shards_dir, layout.samples_dir, layout.rejected_dir, layout.funnel_path,
                layout.checksums_path, layout.shard_work_dir, *embeddings)

    def prepare(self, context: StageContext, state: StageState) -> None:
        reopen_if_damaged(context.layout, state)

    def run(self, context: StageContext) -> dict:
        return run_shard_stage(context.recipe, context.engine, context.stages)
