"""Translate stage: the captions of the sources `translate.sources` names (English ones) into
Chinese, after ingest and before the text stage, whose normalization and Chinese-ratio filter then
read the translation.

Only in builds whose recipe has a `translate:` section (`only_with`): a build without one has the
stage list, fingerprints and outputs it had before the stage existed.

1. On the driver: the unique captions of those sources' readable rows that the cache
   (ops/translate_cache.py) has no entry for, into `work/translate/todo.parquet`.
2. Through the engine's map, in chunks: the backend (ops/translate_backends.py, loaded once per
   worker process and only when something is left to translate) translates each chunk, which
   becomes one cache part. An interrupted stage resumes with what the cache still lacks.
3. Through the engine's map, per ingest part of those sources: `work/translate/parts/<part>`,
   the same rows with `caption_raw` the translation and `caption_en` the source's caption; a row
   the backend gave no translation for carries `translate:failed` (rejected/, stage translate).
The text stage reads these parts in place of the ingest parts of the translated sources.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import polars as pl

from cnclip.corpus.manifests.schemas import INGEST_COLUMNS, TRANSLATE_TODO, TRANSLATED
from cnclip.corpus.ops import translate_cache
from cnclip.corpus.ops.translate_backends import backend_identity, libraries_quiet, load_backend
from cnclip.corpus.recipe import Recipe
from cnclip.corpus.recipe.translate import TranslateSettings
from cnclip.corpus.runtime import storage
from cnclip.corpus.runtime.commit import committed_parts, discard_uncommitted, is_committed
from cnclip.corpus.runtime.engine import Engine
from cnclip.corpus.runtime.layout import BuildLayout, at
from cnclip.corpus.runtime.stage import Stage, StageContext

TRANSLATE_VERSION = "translate-v1"  # bump when what a translated part holds changes
FAILED = "translate:failed"
# Captions per map task: one cache part each, so an interrupted run loses at most one chunk's work.
_CHUNK_BATCHES = 64


def cache_dir(recipe: Recipe) -> Path | str:
    """The recipe's `translate.cache`, or the build's own default under its work folder."""
    settings = recipe.translate
    return settings.cache if settings.cache is not None else BuildLayout.of(recipe).translate_cache_dir


def translated_parts(recipe: Recipe) -> dict[str, Path | str]:
    """Ingest part name -> its translated part, for every ingest part of a translated source (ingest
    names its parts `<source index>-<file index>.parquet`); empty without a translate section."""
    if recipe.translate is None:
        return {}
    layout = BuildLayout.of(recipe)
    indices = {i for i, source in enumerate(recipe.sources) if source.name in recipe.translate.sources}
    return {Path(part).name: at(layout.translate_parts_dir, Path(part).name)
            for part in committed_parts(layout.ingest_dir, ".parquet")
            if int(Path(part).name.partition("-")[0]) in indices}


def _eligible(frame: pl.LazyFrame) -> pl.Expr:
    """The rows to translate: those ingest could read, with a caption."""
    readable = pl.col("reason").is_null() if "reason" in frame.collect_schema().names() else pl.lit(True)
    return readable & pl.col("caption_raw").is_not_null()


def _write_todo(parts: list[Path | str], cache: pl.LazyFrame, todo: Path | str) -> tuple[int, int]:
    """The unique captions to translate that the cache lacks -> `todo`, sorted; returns (unique
    captions, how many of them are to translate)."""
    frames = [frame.filter(_eligible(frame)).select(pl.col("caption_raw").alias("text"))
              for frame in (storage.scan_parquet(part) for part in parts)]
    unique = pl.concat(frames).unique() if frames else pl.LazyFrame(schema={"text": pl.String})
    missing = unique.join(cache.select("text"), on="text", how="anti").sort("text")
    TRANSLATE_TODO.write(missing, todo)
    total = unique.select(pl.len()).collect().item()
    return total, storage.scan_parquet(todo).select(pl.len()).collect().item()


@dataclass(frozen=True)
class ChunkTask:
    """Rows [offset, offset + length) of the todo table, translated into one cache part."""

    todo: Path | str
    offset: int
    length: int
    settings: TranslateSettings
    model: str  # the backend's identity, the cache key
    cache_dir: Path | str
    log: Path | str | None  # where the libraries' warnings go (None: a URL work folder, left as they are)


_LOADED: dict = {}  # (settings, identity) -> backend: one model in memory per worker process


def _backend(task: ChunkTask):
    key = (task.settings.model_dump_json(), task.model)
    if key not in _LOADED:
        _LOADED.clear()
        _LOADED[key] = load_backend(task.settings)
    return _LOADED[key]


def translate_chunk(task: ChunkTask) -> int:
    """Runs as a task: one chunk of captions through the backend, into the cache; returns its size."""
    texts = storage.scan_parquet(task.todo).slice(task.offset, task.length).collect()["text"].to_list()
    with libraries_quiet(task.log):
        translations = _backend(task).translate(texts)
    translate_cache.add(task.cache_dir, task.settings.backend, task.model, texts, translations)
    return len(texts)


@dataclass(frozen=True)
class PartTask:
    source_part: Path | str
    out_part: Path | str
    backend: str
    model: str
    cache_dir: Path | str


def translate_part(task: PartTask) -> int:
    """Runs as a task: one ingest part -> its translated part; returns its rows without a translation."""
    frame = storage.scan_parquet(task.source_part)
    names = frame.collect_schema().names()
    eligible = _eligible(frame)
    # The cache's rows for this part's captions only (a shared cache holds many builds' captions).
    translations = (translate_cache.cached(task.cache_dir, task.backend, task.model).rename({"text": "caption_raw"})
                    .join(frame.select("caption_raw").unique(), on="caption_raw", how="semi"))
    joined = frame.join(translations, on="caption_raw", how="left", maintain_order="left")
    failed = eligible & pl.col("translation").is_null()
    reason = pl.col("reason") if "reason" in names else pl.lit(None, pl.String)
    detail = pl.col("detail") if "detail" in names else pl.lit(None, pl.String)
    translated = joined.with_columns(
        pl.when(eligible).then(pl.col("caption_raw")).otherwise(None).alias("caption_en"),
        pl.when(eligible & ~failed).then(pl.col("translation")).otherwise(pl.col("caption_raw")).alias("caption_raw"),
        pl.when(failed).then(pl.lit(FAILED)).otherwise(reason).alias("reason"),
        pl.when(failed).then(pl.lit(f"the {task.backend} backend gave no translation of caption_en"))
        .otherwise(detail).alias("detail"),
    ).drop("translation")
    own = [*INGEST_COLUMNS, "caption_en", "reason", "detail"]
    result = translated.select(*own, pl.all().exclude(own)).collect()
    TRANSLATED.write(result, task.out_part)
    return result.filter(pl.col("reason") == FAILED).height


def run_translate_stage(recipe: Recipe, engine: Engine) -> dict:
    """Translate what the cache lacks, then write every translated source's parts (parts written by
    an interrupted run are kept)."""
    layout = BuildLayout.of(recipe)
    settings = recipe.translate
    cache = cache_dir(recipe)
    for folder in (layout.translate_dir, layout.translate_parts_dir, cache):
        storage.make_dirs(folder)
    discard_uncommitted(layout.translate_parts_dir)
    model = backend_identity(settings)
    sources = translated_parts(recipe)
    parts = [at(layout.ingest_dir, name) for name in sources]
    todo = at(layout.translate_dir, "todo.parquet")
    unique, missing = _write_todo(parts, translate_cache.cached(cache, settings.backend, model), todo)
    size = settings.batch_size * _CHUNK_BATCHES
    log = None if layout.remote else at(layout.translate_dir, "libraries.log")
    chunks = [ChunkTask(todo, offset, size, settings, model, cache, log) for offset in range(0, missing, size)]
    # One process: the model is loaded once, and a GPU is not shared between workers.
    engine.map_parts(translate_chunk, chunks, "translate: captions", 1)
    tasks = [PartTask(part, out, settings.backend, model, cache) for part, out in zip(parts, sources.values(),
                                                                                       strict=True)]
    engine.map_parts(translate_part, [t for t in tasks if not is_committed(t.out_part)], "translate: parts")
    failed = storage.scan_parquet(list(sources.values())).filter(pl.col("reason") == FAILED).select(pl.len()) \
        .collect().item() if sources else 0
    return {"captions": unique, "translated": missing, "cached": unique - missing, "failed": failed,
            "model": model}


class TranslateStage(Stage):
    """Ingest parts of English sources -> translated parts; covers the translate section and what
    translates (the model's files, or the command and the files it names)."""

    name = "translate"
    needs = ("ingest",)
    sections = ("translate",)
    only_with = "translate"

    def extra(self, recipe: Recipe) -> list:
        return [TRANSLATE_VERSION, backend_identity(recipe.translate)]

    def outputs(self, layout: BuildLayout) -> tuple:
        return (layout.translate_dir,)

    def run(self, context: StageContext) -> dict:
        return run_translate_stage(context.recipe, context.engine)

    def report(self, summary: dict) -> str:
        return (f"translate: {summary['captions']} unique captions, {summary['translated']} sent to the backend, "
                f"{summary['cached']} from the cache; {summary['failed']} rows without a translation")
