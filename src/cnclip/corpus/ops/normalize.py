"""Chinese caption normalization over whole columns: no Python call per caption.

Order matters: control characters go first (so the batch separators below cannot occur in the
data), then HTML entities, NFKC (full-width -> half-width), invisible format characters,
whitespace, and last OpenCC, which sees clean text. U+FFFD (a byte that was not text somewhere
upstream) is kept here and rejected by the text filters (`text:replacement_char`).
"""

from __future__ import annotations

import html
import re
import unicodedata
from functools import lru_cache

import polars as pl

# C0/C1 controls (tab and newline included) become spaces; whitespace is collapsed afterwards.
_CONTROL = r"[\x00-\x1f\x7f-\x9f]"
# Invisible format characters carry no text; they are removed, not spaced: every character of
# Unicode category Cf (zero-width space/joiners, bidi marks, embeddings and isolates, soft hyphen,
# BOM, U+180E, interlinear annotation marks U+FFF9-FFFB, tag characters U+E0000-E007F, ...) plus
# U+034F COMBINING GRAPHEME JOINER (category Mn, but as invisible). One regex over the column.
_INVISIBLE = r"[\p{Cf}\u034f]"
# html.unescape never produces U+0001 (it maps &#1; to ''), so it can separate captions in a batch.
_UNESCAPE_SEPARATOR = "\x01"
_CONTROL_RE, _SPACES_RE = re.compile(_CONTROL), re.compile(r"\s+")
_OPENCC_BATCH = 50_000


@lru_cache(maxsize=4)
def _opencc(config: str):
    import opencc

    return opencc.OpenCC(config)


def _unescape_html(captions: pl.Series) -> pl.Series:
    """Unescape entities in the captions that contain '&', in one html.unescape call per batch."""
    has_entity = captions.str.contains("&", literal=True).fill_null(False)
    if not has_entity.any():
        return captions
    subset = captions.filter(has_entity).to_list()
    unescaped = html.unescape(_UNESCAPE_SEPARATOR.join(subset)).split(_UNESCAPE_SEPARATOR)
    if len(unescaped) != len(subset):  # cannot happen (see the separator), kept as a guard
        unescaped = [html.unescape(c) for c in subset]
    positions = has_entity.arg_true()
    return captions.scatter(positions, pl.Series(unescaped, dtype=pl.String))


def convert_chinese(captions: pl.Series, config: str = "t2s") -> pl.Series:
    """OpenCC over newline-joined batches: one native call per 50k captions.

    Captions must be free of newlines (normalize_captions guarantees it).
    """
    converter = _opencc(config)
    values = captions.to_list()
    out: list[str] = []
    for start in range(0, len(values), _OPENCC_BATCH):
        batch = values[start : start + _OPENCC_BATCH]
        converted = converter.convert("\n".join(batch)).split("\n")
        if len(converted) != len(batch):  # a dictionary entry spanning lines would be a bug in OpenCC
            converted = [converter.convert(c) for c in batch]
        out.extend(converted)
    return pl.Series(captions.name, out, dtype=pl.String)


def normalize_captions(raw: pl.Series, opencc_config: str | None = "t2s") -> pl.Series:
    """Raw captions -> normalized captions (nulls become empty strings)."""
    captions = raw.cast(pl.String).fill_null("").str.replace_all(_CONTROL, " ")
    captions = _unescape_html(captions)
    captions = (
        captions.str.normalize("NFKC")
        .str.replace_all(_CONTROL, " ")
        .str.replace_all(_INVISIBLE, "")
        .str.replace_all(r"\s+", " ")
        .str.strip_chars()
    )
    if opencc_config:
        captions = convert_chinese(captions, opencc_config)
    return captions.rename("caption")


def normalize_texts(texts: list[str], opencc_config: str | None = "t2s") -> list[str]:
    """Texts given to a model (search queries, eval and training captions) normalized as
    normalize_captions normalizes captions, so `２０２３年ＮＢＡ總決賽` reaches the model as the
    `2023年NBA总决赛` it learnt; idempotent on captions already normalized.

    Plain Python, not polars: tokenizers run this inside forked data-loader workers, where a
    polars call deadlocks on the thread pool the parent process started.
    """
    out = []
    for text in texts:
        text = _CONTROL_RE.sub(" ", text or "")
        text = html.unescape(text) if "&" in text else text
        text = _CONTROL_RE.sub(" ", unicodedata.normalize("NFKC", text))
        text = "".join(ch for ch in text if ch != "\u034f" and unicodedata.category(ch) != "Cf")
        out.append(_SPACES_RE.sub(" ", text).strip())
    if opencc_config and out:
        converter = _opencc(opencc_config)
        out = [converter.convert(text) for text in out]
    return out


def normalize_phrases(phrases: list[str], opencc_config: str | None = "t2s") -> list[str]:
    """Blacklist phrases go through the same normalization as captions so they match them."""
    if not phrases:
        return []
    normalized = normalize_captions(pl.Series(phrases, dtype=pl.String), opencc_config)
    return sorted({p for p in normalized.to_list() if p})
