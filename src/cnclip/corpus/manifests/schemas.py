"""Every table the build writes, declared once: the manifests (samples/, rejected/) and the work
files one stage leaves for the next, each with its columns and their types.

- Writers go through `Table.write`, which refuses a frame whose columns or types are not its
  table's (a missing column, a wrong type, a column of another table's): such a frame is a bug in
  the stage that made it, caught where it is written instead of stages later where it is read.
- The names a source's `keep_columns` may not take are derived from these tables
  (`reserved_columns`): a kept column under one of them would shadow the build's column, or be
  overwritten by it in a join.
- manifests/README.md's tables are tested against these (tests/test_schemas.py).

Manifests: every samples/ part has one schema, every rejected/ part another, so
`pl.read_parquet("rejected/*.parquet")`, DuckDB's `read_parquet` and a pyarrow dataset read a
folder in one line. A column that does not apply to a row (a download reject's `duplicate_of`,
another source's keep_columns) is null. The keep_columns of every source come last, in source
order, with the type polars unifies them to across sources.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import polars as pl

from cnclip.corpus.runtime.state import write_parquet_atomic

Columns = Mapping[str, pl.DataType]


class SchemaError(RuntimeError):
    """A stage wrote a frame its table does not allow: a bug in the build, not in its input, so
    no CnclipError (the CLI keeps the traceback). The message names the file and the column."""


@dataclass(frozen=True)
class Table:
    """One kind of file the build writes.

    name: where it lies under `root` (a glob for a folder of parts), as errors and
    manifests/README.md name it. columns: in every file, of these types. optional: in some files
    only (a part of an input file with unreadable rows), of these types where present.
    keep_columns: the sources' keep_columns may follow, of any type. ordered: `columns` come
    first and in this order (a folder reads in one line only when its parts' columns line up).
    reserves: its column names are the build's (False for a source's own files, whose extra
    columns are keep columns further on).
    """

    name: str
    root: Literal["output_dir", "manifest_dir"]
    stage: str
    columns: Columns
    optional: Columns = field(default_factory=dict)
    keep_columns: bool = False
    ordered: bool = False
    reserves: bool = True

    @property
    def declared(self) -> dict[str, pl.DataType]:
        return {**self.columns, **self.optional}

    def problems(self, schema: Columns) -> list[str]:
        """What in `schema` this table does not allow, one phrase per column."""
        found = []
        for name, dtype in self.declared.items():
            if name not in schema:
                if name in self.columns:
                    found.append(f"no column {name!r} (declared {dtype})")
            elif schema[name] != dtype:
                found.append(f"column {name!r} is {schema[name]}, declared {dtype}")
        reserved = reserved_columns()
        for name in schema:
            if name in self.declared:
                continue
            if not self.keep_columns:
                found.append(f"column {name!r} is not declared")
            elif name in reserved:  # the recipe refuses such keep columns: this one leaked from a join
                found.append(f"column {name!r} is not declared here ({reserved[name]})")
        first = list(schema)[: len(self.columns)]
        if self.ordered and not found and first != list(self.columns):
            found.append(f"columns out of order: {', '.join(first)}")
        return found

    def validate(self, frame: pl.DataFrame | pl.LazyFrame | Columns, path: Path | str) -> None:
        """Raise SchemaError naming `path` and the columns that do not match."""
        schema = frame if isinstance(frame, Mapping) else frame.collect_schema()
        problems = self.problems(schema)
        if problems:
            raise SchemaError(f"{path}: {'; '.join(problems)} (table {self.name} in manifests/schemas.py)")

    def write(self, frame: pl.DataFrame | pl.LazyFrame, path: Path) -> None:
        """Validate, then write atomically (state.write_parquet_atomic)."""
        self.validate(frame, path)
        write_parquet_atomic(frame, path)

    def with_keep_columns(self, keep_columns: Columns) -> "Table":
        """This table with the build's keep columns declared after its own, of their types: what a
        manifest part of this build holds exactly (null where a row has no value)."""
        if not self.keep_columns:
            raise ValueError(f"table {self.name} takes no keep columns")
        return replace(self, columns=dict(full_schema(dict(self.columns), dict(keep_columns))))

    def check_file(self, path: Path) -> None:
        """Validate a written file by its footer (tests, and readers that distrust a part)."""
        self.validate(pl.read_parquet_schema(path), path)


_STR, _I64, _I32 = pl.String(), pl.Int64(), pl.Int32()

# What ingest writes before the source's own columns (stages/ingest.py); every later work file of
# a row starts with these.
INGEST_COLUMNS: dict[str, pl.DataType] = {
    "uid": _I64, "source": _STR, "row": _I64, "url": _STR, "caption_raw": _STR,
}
# The verdict of a row ingest could not read (sources/rows.py), and of every row after the text filters.
_VERDICT = {"reason": _STR, "detail": _STR}
_SIZES = {"width": _I32, "height": _I32, "original_width": _I32, "original_height": _I32}
# A build with a `translate` section: the English caption a translated row's source gave (its
# caption_raw is then the translation), null for the rows of the other sources. Only such a build's
# files have the column, so a build without the section writes exactly what it wrote before.
CAPTION_EN = {"caption_en": _STR}

SAMPLE_SCHEMA: dict[str, pl.DataType] = {
    "key": _STR, "shard": _I64, "uid": _I64, "source": _STR, "row": _I64,
    "url": _STR, "caption": _STR, "caption_raw": _STR, **_SIZES, "sha256": _STR, "phash": _STR,
}
REJECTED_SCHEMA: dict[str, pl.DataType] = {
    **INGEST_COLUMNS, "caption": _STR, "stage": _STR, **_VERDICT,
    "duplicate_of": _STR, "duplicate_of_uid": _I64, **_SIZES, "sha256": _STR,
}
# One row per row the dedup stage drops (ops/dedup.py builds them).
DECISION_SCHEMA: dict[str, pl.DataType] = {
    "uid": _I64, "reason": _STR, "duplicate_of_uid": _I64, "duplicate_of_eval": _STR, "detail": _STR,
}

CRAWL_PAIRS = Table("work/crawl/*.parquet", "output_dir", "ingest",
                    {"url": _STR, "caption_raw": _STR, "page_url": _STR, "alt_source": _STR}, reserves=False)
INGEST = Table("work/ingest/*.parquet", "output_dir", "ingest", INGEST_COLUMNS, optional=_VERDICT,
               keep_columns=True)
# The translate stage (stages/translate.py): each ingest part of a translated source, its
# caption_raw the translation; a row with no translation carries the verdict translate:failed.
TRANSLATED = Table("work/translate/parts/*.parquet", "output_dir", "translate", {**INGEST_COLUMNS, **CAPTION_EN},
                   optional=_VERDICT, keep_columns=True)
# The unique captions the cache did not have, one run's work for the backend.
TRANSLATE_TODO = Table("work/translate/todo.parquet", "output_dir", "translate", {"text": _STR}, reserves=False)
# The translation cache (ops/translate_cache.py; `translate.cache`, by default this folder): one
# row per (backend, model identity, English caption); `translation` null where the backend gave none.
TRANSLATE_CACHE = Table("work/translate-cache/*.parquet", "output_dir", "translate",
                        {"backend": _STR, "model": _STR, "text": _STR, "translation": _STR}, reserves=False)
TEXT_NORMALIZED = Table("work/text/normalized/*.parquet", "output_dir", "text",
                        {**INGEST_COLUMNS, "caption": _STR, **_VERDICT}, optional=CAPTION_EN, keep_columns=True)
TEXT_DUPLICATE_PAIRS = Table("work/text/duplicate_pairs.parquet", "output_dir", "text",
                             {"uid": _I64, "first_uid": _I64})
TEXT_REPEATED_CAPTIONS = Table("work/text/repeated_captions.parquet", "output_dir", "text",
                               {"caption": _STR, "caption_count": pl.UInt32()})
TEXT_ACCEPTED = Table("work/text/accepted/*.parquet", "output_dir", "text", {**INGEST_COLUMNS, "caption": _STR},
                      optional=CAPTION_EN, keep_columns=True)
TEXT_REJECTED = Table("work/text/rejected/*.parquet", "output_dir", "text",
                      {**INGEST_COLUMNS, "caption": _STR, **_VERDICT, "duplicate_of_uid": _I64, "stage": _STR},
                      optional=CAPTION_EN, keep_columns=True)

# The attempts table: what the download stage made of each row.
# One row per attempted input row (its latest attempt: a --retry-failed round replaces the
# rows it retried), written by stages/download_attempts.py from img2dataset's per-part results;
# hash, dedup, shard and --retry-failed read only this. `tar` is the img2dataset part holding the
# image, relative to work/download/, and `key` its member's name there (`{key}.{encode_format}`);
# both are null unless status is success. `reason` is null for a success, else a reason code
# (network:*, politeness:*, download:*) and `detail` img2dataset's error message.
ATTEMPTS_SCHEMA: dict[str, pl.DataType] = {
    "uid": _I64, "part": _I64, "tar": _STR, "key": _STR, "status": _STR, **_VERDICT, **_SIZES, "sha256": _STR,
}
ATTEMPTS = Table("work/download/attempts.parquet", "output_dir", "download", ATTEMPTS_SCHEMA)
# The routing of rows to the download's lanes and img2dataset parts, one plan per download round
# (stages/download_lanes.py); the parts' own inputs beside it are img2dataset's Arrow files.
DOWNLOAD_PLAN = Table("work/download-input/plan*.parquet", "output_dir", "download",
                      {"uid": _I64, "lane": _I32, "part": _I64})
# What the routing reads and writes on the engine's executors (stages/download_routing.py): each
# accepted part's rows as sent, with their host and its first lane; then each row's lane and its
# part's index within that lane. Internal to the download: no keep column meets them.
DOWNLOAD_SENT = Table("work/download-input/sent/*.parquet", "output_dir", "download",
                      {"uid": _I64, "url": _STR, "caption": _STR, "host": _STR, "first_lane": _I64}, reserves=False)
DOWNLOAD_ROUTES = Table("work/download-input/routes*.parquet", "output_dir", "download",
                        {"uid": _I64, "url": _STR, "caption": _STR, "lane": _I32, "lane_part": _I64}, reserves=False)
# One img2dataset part's results as attempts rows (download_attempts.py), before the latest of each
# row is chosen across parts.
ATTEMPT_PARTS = Table("work/download-input/attempts/*.parquet", "output_dir", "download", ATTEMPTS_SCHEMA,
                      reserves=False)


# img2dataset's own per-part columns (work/download/*.parquet, its output format, not declared
# here): the stages after the download read them, so a keep column may not take these names.
IMG2DATASET_COLUMNS = ("uid", "url", "caption", "key", "status", "error_message", *_SIZES, "sha256", "exif")

HASHES = Table("work/hash/*.parquet", "output_dir", "hash", {"uid": _I64, "phash": pl.UInt64()})
HASH_MEMBERS = Table("work/hash-members.parquet", "output_dir", "hash", {"part": _I64, "key": _STR, "uid": _I64})
DEDUP_DECISIONS = Table("work/dedup/decisions.parquet", "output_dir", "dedup", DECISION_SCHEMA)
# An embeddings work part carries each pair's clip_score (the two embeddings' cosine), which the
# CLIP-score filter and samples/ read without the embeddings.
_CLIP_SCORE = {"clip_score": pl.Float32()}
SHARD_PLAN = Table("work/shard/plan.parquet", "output_dir", "shard", {
    **INGEST_COLUMNS, "caption": _STR, "download_key": _STR, "download_tar": _STR, **_SIZES, "sha256": _STR,
    "phash": pl.UInt64(), "position": _I64, "shard": _I64, "key": _STR,
}, optional={**_CLIP_SCORE, **CAPTION_EN}, keep_columns=True)
# Embeddings (embed stage; cnclip/embed/store.py reads and writes them): one row per sample that
# survived dedup, its image's and its caption's embedding by the recipe's embed model, of unit
# length, stored float16. The width is the model's: `store.embeddings_table(width)` is this table
# at that width (512 below only declares the type). Work parts follow the download parts; the
# published ones follow the shards and carry the sample's key (and `clip_score`, their cosine).
_EMBEDDING = pl.Array(pl.Float16(), 512)
EMBEDDINGS = Table("work/embed/*.parquet", "output_dir", "embed",
                   {"uid": _I64, "image_embedding": _EMBEDDING, "text_embedding": _EMBEDDING}, optional=_CLIP_SCORE)
# The same pairs' clip_score alone, part for part: what the engine's steps read (the CLIP-score
# filter's ranking, samples/' column); Spark's Parquet reader refuses float16 columns.
EMBED_SCORES = Table("work/embed-scores/*.parquet", "output_dir", "embed", {"uid": _I64, "clip_score": pl.Float32()})
# A download part's rows dedup kept, with their tar member and caption: what each embed task reads.
EMBED_MEMBERS = Table("work/embed-members.parquet", "output_dir", "embed",
                      {"part": _I64, "key": _STR, "uid": _I64, "caption": _STR})
# One row per sample the embed stage drops (CLIP-score filter, semantic dedup), as dedup's decisions.
EMBED_DECISIONS = Table("work/embed-decisions.parquet", "output_dir", "embed", DECISION_SCHEMA)
# Semantic dedup's steps (stages/embed_semantic.py), each written by engine tasks so the driver
# never holds the build's embeddings: the rows the k-means sample is drawn from (each part's rows
# of the smallest draws, a hash of the uid), the centroids trained on that sample (`trained_on`:
# how many of the sample's rows are nearest each, summing to the sample's size), every kept row's
# cluster with its image embedding (one part per embeddings part, sorted by cluster so a task
# reading a few clusters skips the others' row groups) and each group of clusters' decisions.
SEMANTIC_SAMPLE = Table("work/embed-semantic/sample/*.parquet", "output_dir", "embed",
                        {"uid": _I64, "draw": pl.UInt64(), "image_embedding": _EMBEDDING})
SEMANTIC_CENTROIDS = Table("work/embed-semantic/centroids.parquet", "output_dir", "embed",
                           {"cluster": _I64, "centroid": pl.Array(pl.Float32(), 512), "trained_on": _I64})
SEMANTIC_ASSIGNED = Table("work/embed-semantic/assigned/*.parquet", "output_dir", "embed",
                          {"uid": _I64, "cluster": _I64, "image_embedding": _EMBEDDING})
SEMANTIC_DECISIONS = Table("work/embed-semantic/decisions/*.parquet", "output_dir", "embed", DECISION_SCHEMA)
PUBLISHED_EMBEDDINGS = Table("embeddings/*.parquet", "manifest_dir", "shard", {
    "key": _STR, "uid": _I64, "clip_score": pl.Float32(), "image_embedding": _EMBEDDING, "text_embedding": _EMBEDDING,
}, ordered=True)
# clip_score (after phash, before the keep columns) in the samples of a build with an embed section;
# caption_en (after those, before the keep columns) in a build with a translate section.
SAMPLES = Table("samples/*.parquet", "manifest_dir", "shard", SAMPLE_SCHEMA, optional={**_CLIP_SCORE, **CAPTION_EN},
                keep_columns=True, ordered=True)
REJECTED = Table("rejected/*.parquet", "manifest_dir", "shard", REJECTED_SCHEMA, optional=CAPTION_EN,
                 keep_columns=True, ordered=True)

TABLES: tuple[Table, ...] = (
    CRAWL_PAIRS, INGEST, TRANSLATED, TRANSLATE_TODO, TRANSLATE_CACHE, TEXT_NORMALIZED, TEXT_DUPLICATE_PAIRS,
    TEXT_REPEATED_CAPTIONS, TEXT_ACCEPTED, TEXT_REJECTED,
    DOWNLOAD_PLAN, DOWNLOAD_SENT, DOWNLOAD_ROUTES, ATTEMPT_PARTS, ATTEMPTS, HASHES, HASH_MEMBERS, DEDUP_DECISIONS,
    EMBEDDINGS, EMBED_SCORES, EMBED_MEMBERS, EMBED_DECISIONS, SEMANTIC_SAMPLE, SEMANTIC_CENTROIDS,
    SEMANTIC_ASSIGNED, SEMANTIC_DECISIONS, SHARD_PLAN, SAMPLES, REJECTED, PUBLISHED_EMBEDDINGS,
)

# Columns a stage adds to a frame holding the keep columns and drops before writing it.
TRANSIENT_COLUMNS = {
    "_line": "numbering a text file's lines in the line reader, sources/rows.py",
}


@functools.cache
def reserved_columns() -> dict[str, str]:
    """Each column name the build itself writes or uses -> where, in words (the recipe's error
    for a keep column of that name: "'phash' is a column the build writes in work/hash/...")."""
    places: dict[str, list[str]] = {}
    for table in TABLES:
        for name in table.declared if table.reserves else ():
            places.setdefault(name, []).append(table.name)
    for name in IMG2DATASET_COLUMNS:
        places.setdefault(name, []).append("img2dataset's work/download/*.parquet")
    reserved = {name: f"a column the build writes in {', '.join(where)}" for name, where in places.items()}
    reserved.update({name: f"a column the build uses in memory, {use}" for name, use in TRANSIENT_COLUMNS.items()})
    return reserved


def keep_column_types(ingest_dir: Path | str) -> dict[str, pl.DataType]:
    """Every source's keep_columns and their unified types, read from the ingest parts' footers."""
    from cnclip.corpus.runtime.commit import committed_parts
    from cnclip.corpus.runtime.storage import scan_parquet

    parts = committed_parts(ingest_dir, ".parquet")  # a local folder or a URL work_dir's
    if not parts:
        return {}
    schema = pl.concat([scan_parquet(p) for p in parts], how="diagonal_relaxed").collect_schema()
    # A column the pipeline itself writes (e.g. a reason or detail set at ingest) is never a keep column.
    return {name: dtype for name, dtype in schema.items() if name not in reserved_columns()}


def conform(frame: pl.DataFrame, base: dict[str, pl.DataType], extras: dict[str, pl.DataType]) -> pl.DataFrame:
    """`frame` with exactly base + extras columns, in that order and of those types (nulls where absent)."""
    schema = full_schema(base, extras)
    missing = [pl.lit(None, dtype).alias(name) for name, dtype in schema.items() if name not in frame.columns]
    return frame.with_columns(missing).select(pl.col(name).cast(dtype) for name, dtype in schema.items())


def full_schema(base: dict[str, pl.DataType], extras: dict[str, pl.DataType]) -> pl.Schema:
    """base, then the keep_columns (a keep column never shadows a base one: the recipe forbids it)."""
    return pl.Schema({**base, **{k: v for k, v in extras.items() if k not in base}})
