"""Text stage: normalize captions and filter them before any byte of an image is downloaded.

Per part (parallel): normalization and the per-row filters, as polars expressions.
Global (lazy polars over all parts): repeated (url, caption) rows collapsed to the first, then
the caption-frequency cap. Per part again: the split into accepted/ and rejected/ parts.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import polars as pl

from cnclip.corpus.manifests.schemas import (
    TEXT_ACCEPTED,
    TEXT_DUPLICATE_PAIRS,
    TEXT_NORMALIZED,
    TEXT_REJECTED,
    TEXT_REPEATED_CAPTIONS,
)
from cnclip.corpus.ops.normalize import normalize_captions, normalize_phrases
from cnclip.corpus.recipe import Recipe, RecipeError, TextSettings
from cnclip.corpus.runtime import storage
from cnclip.corpus.runtime.commit import committed_parts, discard_uncommitted, is_committed, remove_part
from cnclip.corpus.runtime.engine import Engine, Table, default_engine, make_engine
from cnclip.corpus.runtime.fingerprints import input_listing
from cnclip.corpus.runtime.layout import BuildLayout, at
from cnclip.corpus.runtime.stage import Stage, StageContext
from cnclip.corpus.stages.ingest import ROW_BITS
from cnclip.corpus.stages.translate import translated_parts

# Captions that are a camera / app file name or a bare link describe nothing in the image.
_FILE_NAME = r"(?i)^[^\s/\\]{0,80}\.(?:jpe?g|png|gif|webp|bmp|tiff?|heic|heif|avif|jfif|svg)$"
_CAMERA_NAME = (
    r"(?i)^(?:img|dsc[nf]?|pic|pxl|mvimg|vid|screenshot|wechat|mmexport|微信图片|qq图片|截图|截屏|屏幕截图)"
    r"[_\- ]?\d{3,}[\d_\- ]*$"
)
_BARE_URL = r"(?i)^(?:https?://|ftp://|www\.)\S*$"
_SUPPORTED_URL = r"(?i)^(?:https?|file)://\S"
_FILE_URL = r"(?i)^\s*file:"
_COMMON = ["uid", "url", "caption", "reason"]

# Reasons ingest itself gives (a row it could not read, a caption that is not text); such rows
# arrive with `reason` and `detail` set and keep them.
INGEST_REASONS = ["ingest:bad_row", "ingest:caption_not_text"]
PER_ROW_REASONS = [
    *INGEST_REASONS,
    "ingest:missing_url",
    "ingest:local_file_not_allowed",
    "ingest:unsupported_url",
    "text:replacement_char",
    "text:filename_or_url",
    "text:blacklisted",
    "text:too_short",
    "text:too_long",
    "text:not_chinese",
]
GLOBAL_REASONS = ["text:duplicate_pair", "text:repeated_caption"]


def load_blacklist(settings: TextSettings) -> list[str]:
    """Built-in boilerplate phrases (if on) plus the recipe's file, normalized like captions."""
    lines: list[str] = []
    if settings.default_blacklist:
        lines += resources.files("cnclip.corpus").joinpath("data/blacklist.txt").read_text("utf-8").splitlines()
    if settings.blacklist:
        try:
            lines += Path(settings.blacklist).read_text("utf-8").splitlines()
        except OSError as err:
            raise RecipeError(f"text.blacklist: cannot read {settings.blacklist!r} ({err.strerror})") from None
    phrases = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    return normalize_phrases(phrases, settings.opencc_config)


def cjk_ratio(caption: pl.Expr) -> pl.Expr:
    """Han characters among all letters (digits, punctuation and spaces do not count)."""
    letters = caption.str.count_matches(r"\p{L}")
    han = caption.str.count_matches(r"\p{Han}")
    return pl.when(letters > 0).then(han / letters).otherwise(0.0)


def per_row_reason(settings: TextSettings, blacklist: list[str], local_files: bool = False,
                   own_images: str | None = None) -> pl.Expr:
    """The first per-row filter a row fails (null when it passes them all).

    local_files: the recipe lists download.allow_local_files; without it a file:// URL is
    rejected here (the download worker's guard checks the folders of those that pass), unless
    it starts with `own_images`, the file:// URL of the build's own work/sources/ folder."""
    url, caption = pl.col("url"), pl.col("caption")
    length = caption.str.len_chars()
    rules: list[tuple[pl.Expr, str]] = [(url.is_null() | (url == ""), "ingest:missing_url")]
    if not local_files:
        outside = url.str.contains(_FILE_URL)
        if own_images:
            outside = outside & ~url.str.starts_with(own_images)
        rules.append((outside, "ingest:local_file_not_allowed"))
    rules += [
        (~url.str.contains(_SUPPORTED_URL), "ingest:unsupported_url"),
        # U+FFFD survives normalization only where bytes were lost before the caption reached us
        # (a mis-decoded page, a lossy export): the text is damaged, not merely unusual.
        (caption.str.contains("\ufffd", literal=True), "text:replacement_char"),
    ]
    if settings.reject_filenames:
        name_like = caption.str.contains(_FILE_NAME) | caption.str.contains(_CAMERA_NAME)
        rules.append((name_like | caption.str.contains(_BARE_URL), "text:filename_or_url"))
    if blacklist:
        rules.append((caption.str.contains_any(blacklist, ascii_case_insensitive=True), "text:blacklisted"))
    rules += [
        (length < settings.min_chars, "text:too_short"),
        (length > settings.max_chars, "text:too_long"),
        (cjk_ratio(caption) < settings.min_cjk_ratio, "text:not_chinese"),
    ]
    condition, reason = rules[0]
    chain = pl.when(condition).then(pl.lit(reason))
    for condition, reason in rules[1:]:
        chain = chain.when(condition).then(pl.lit(reason))
    return chain.otherwise(pl.lit(None, pl.String)).alias("reason")


@dataclass(frozen=True)
class _NormalizeTask:
    source_part: Path | str  # a local path or a URL (runtime/storage.py), as every part below
    out_part: Path | str
    settings: TextSettings
    blacklist: tuple[str, ...]
    local_files: bool = False
    own_images: str | None = None
    # A build with a translate section: every part carries caption_en (null where not translated).
    caption_en: bool = False


def normalize_part(task: _NormalizeTask) -> int:
    """One ingest part -> the same rows with `caption`, the per-row `reason` and `detail`.

    Rows ingest already rejected (a part of a file with bad rows carries `reason` and `detail`)
    keep ingest's verdict; every other row gets the filters' (detail null)."""
    frame = storage.read_parquet(task.source_part)
    caption = normalize_captions(frame["caption_raw"], task.settings.opencc_config)
    verdict = per_row_reason(task.settings, list(task.blacklist), task.local_files, task.own_images)
    if "reason" in frame.columns:
        verdict = pl.coalesce(pl.col("reason"), verdict).alias("reason")
    if "detail" not in frame.columns:
        frame = frame.with_columns(pl.lit(None, pl.String).alias("detail"))
    if task.caption_en and "caption_en" not in frame.columns:
        frame = frame.with_columns(pl.lit(None, pl.String).alias("caption_en"))
    frame = frame.with_columns(caption).with_columns(verdict)
    TEXT_NORMALIZED.write(frame, task.out_part)
    return frame.height


# The global steps, in SQL every engine runs (runtime/engine.py). `rows`: the rows that passed
# the per-row filters. A row repeating an earlier (url, caption) points at the first one.
_DUPLICATE_PAIRS = """
SELECT r.uid, f.first_uid FROM rows r
JOIN (SELECT url, caption, MIN(uid) AS first_uid FROM rows GROUP BY url, caption) f
  ON r.url = f.url AND r.caption = f.caption
WHERE r.uid <> f.first_uid
"""
# The cap counts the rows left after pair collapsing.
_REPEATED_CAPTIONS = """
SELECT caption, COUNT(*) AS caption_count FROM rows r LEFT ANTI JOIN duplicates d ON r.uid = d.uid
GROUP BY caption HAVING COUNT(*) > {cap}
"""


def find_global_rejects(parts: list[Path | str], settings: TextSettings, out_dir: Path | str,
                        engine: Engine | None = None) -> tuple[Path | str, Path | str]:
    """Duplicate (url, caption) pairs and over-frequent captions, over every part at once."""
    engine = engine or default_engine()
    rows = engine.sql(f"SELECT {', '.join(_COMMON)} FROM parts WHERE reason IS NULL", parts=engine.scan(parts))
    duplicates_path, repeated_path = at(out_dir, "duplicate_pairs.parquet"), at(out_dir, "repeated_captions.parquet")
    if settings.dedup_pairs:
        pairs = engine.sql(_DUPLICATE_PAIRS, rows=rows)
    else:
        pairs = engine.scan([], TEXT_DUPLICATE_PAIRS.columns)
    engine.write(pairs, duplicates_path, TEXT_DUPLICATE_PAIRS)
    if settings.max_caption_repeats is not None:
        repeated = engine.sql(_REPEATED_CAPTIONS.format(cap=int(settings.max_caption_repeats)), rows=rows,
                              duplicates=engine.scan([duplicates_path]))
        engine.write(repeated, repeated_path, TEXT_REPEATED_CAPTIONS)
    else:
        engine.write(engine.scan([], TEXT_REPEATED_CAPTIONS.columns), repeated_path, TEXT_REPEATED_CAPTIONS)
    return duplicates_path, repeated_path


@dataclass(frozen=True)
class _SplitTask:
    normalized_part: Path | str
    duplicates: Path | str
    repeated: Path | str
    accepted_part: Path | str
    rejected_part: Path | str
    max_caption_repeats: int | None


def split_part(task: _SplitTask) -> tuple[int, int]:
    """Apply the global verdicts to one part and write its accepted and rejected rows."""
    frame = storage.scan_parquet(task.normalized_part)
    duplicates = storage.scan_parquet(task.duplicates)
    repeated = storage.scan_parquet(task.repeated)
    judged = (
        frame.join(duplicates, on="uid", how="left")
        .join(repeated, on="caption", how="left")
        .with_columns(
            pl.when(pl.col("reason").is_not_null())
            .then(pl.col("reason"))
            .when(pl.col("first_uid").is_not_null())
            .then(pl.lit("text:duplicate_pair"))
            .when(pl.col("caption_count").is_not_null())
            .then(pl.lit("text:repeated_caption"))
            .alias("reason")
        )
        .with_columns(
            pl.when(pl.col("reason") == "text:duplicate_pair")
            .then(pl.format("same url and caption as row {} of this source", pl.col("first_uid") % (1 << ROW_BITS)))
            .when(pl.col("reason") == "text:repeated_caption")
            .then(pl.format("caption occurs {} times (cap {})", "caption_count", pl.lit(task.max_caption_repeats)))
            .otherwise(pl.col("detail"))
            .alias("detail")
        )
        .rename({"first_uid": "duplicate_of_uid"})
        .drop("caption_count")
        .sort("uid")
        .collect()
    )
    accepted = judged.filter(pl.col("reason").is_null()).drop("reason", "detail", "duplicate_of_uid")
    rejected = judged.filter(pl.col("reason").is_not_null()).with_columns(
        pl.col("reason").str.split(":").list.first().alias("stage")
    )
    # Empty parts are not written (img2dataset cannot read an empty input file); remove stale ones.
    for frame, path, table in ((accepted, task.accepted_part, TEXT_ACCEPTED),
                               (rejected, task.rejected_part, TEXT_REJECTED)):
        if frame.height:
            table.write(frame, path)
        else:
            remove_part(path)
    return accepted.height, rejected.height


def run_text_stage(recipe: Recipe, engine: Engine | None = None) -> dict:
    """Normalize + filter every ingest part (parts done by an interrupted run are kept), then the
    global steps and the split into accepted/ and rejected/ parts. `engine`: the build's (called
    alone, the recipe's engine block is built)."""
    layout = BuildLayout.of(recipe)
    settings = recipe.text
    blacklist = tuple(load_blacklist(settings))
    normalized_dir = at(layout.text_dir, "normalized")
    for folder in (normalized_dir, layout.text_accepted_dir, layout.text_rejected_dir):
        storage.make_dirs(folder)
        discard_uncommitted(folder)
    engine = engine or make_engine(recipe.engine)
    processes = settings.processes
    ingest_parts = committed_parts(layout.ingest_dir, ".parquet")
    local_files = bool(recipe.download.allow_local_files)
    # The translate stage's parts stand in for the ingest parts of the sources it translated.
    translated = translated_parts(recipe)
    tasks = [_NormalizeTask(translated.get(Path(p).name, p), at(normalized_dir, Path(p).name), settings, blacklist,
                            local_files, own_images_prefix(recipe), recipe.translate is not None)
             for p in ingest_parts]
    engine.map_parts(normalize_part, [t for t in tasks if not is_committed(t.out_part)], "text: normalize + filter",
                      processes)
    normalized = [t.out_part for t in tasks]
    if not normalized:
        return {"accepted": 0, "rejected": 0}
    duplicates, repeated = find_global_rejects(normalized, settings, layout.text_dir, engine)
    splits = [
        _SplitTask(p, duplicates, repeated, at(layout.text_accepted_dir, Path(p).name),
                   at(layout.text_rejected_dir, Path(p).name),
                   settings.max_caption_repeats)
        for p in normalized
    ]
    counts = engine.map_parts(split_part, splits, "text: duplicates + caption cap", processes)
    return {"accepted": sum(a for a, _ in counts), "rejected": sum(r for _, r in counts)}


def own_images_prefix(recipe: Recipe) -> str | None:
    """The file:// URL prefix of the images the build stored itself (work/sources/), or None."""
    from cnclip.corpus.sources.stored import file_url, own_image_root

    root = own_image_root(recipe)
    return None if root is None else file_url(root) + "/"


class TextStage(Stage):
    """Ingest parts -> text/accepted/ and text/rejected/ parts (ingest's unreadable rows included)."""

    name = "text"
    needs = ("ingest",)
    sections = ("text",)

    def extra(self, recipe: Recipe) -> list:
        blacklist = input_listing([recipe.text.blacklist]) if recipe.text.blacklist else None
        # Whether file:// URLs pass depends on download.allow_local_files being set.
        own = own_images_prefix(recipe)
        return [blacklist, *(["allow_local_files"] if recipe.download.allow_local_files else []),
                *([own] if own else [])]

    def outputs(self, layout: BuildLayout) -> tuple:
        return (layout.text_dir,)

    def run(self, context: StageContext) -> dict:
        return run_text_stage(context.recipe, context.engine)

    def report(self, summary: dict) -> str:
        return f"text: {summary['accepted']} rows accepted, {summary['rejected']} rejected"

    def rejects(self, layout: BuildLayout, engine: Engine, tables: dict[str, Table]) -> list[tuple[str, Table]]:
        """One rejected/ part per text part (ingest's rejects among them), naming the kept
        sample a duplicate pair repeats."""
        named = "SELECT r.*, k.duplicate_of FROM part r LEFT JOIN keys k ON r.duplicate_of_uid = k.duplicate_of_uid"
        return [(f"text-{Path(part).name}", engine.sql(named, part=engine.scan([part]), keys=tables["keys"]))
                for part in committed_parts(layout.text_rejected_dir, ".parquet")]
