"""The dataset source kinds (coco, visual_genome, cn_clip and its presets): each read once into
work/sources/<name>/ (its stored images and rows.parquet), which ingest then reads as one file."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl

from cnclip.corpus.recipe.sources_formats import CnClipSource, CocoSource, VisualGenomeSource
from cnclip.corpus.sources.stored import rows_path, write_rows


def read_format_source(source: CocoSource | VisualGenomeSource | CnClipSource, source_dir: Path) -> pl.DataFrame:
    """The source's rows, its local images stored under `source_dir`."""
    if isinstance(source, CocoSource):
        from cnclip.corpus.sources.coco import read_coco

        return read_coco(source.annotations, source.images, source_dir)
    if isinstance(source, VisualGenomeSource):
        from cnclip.corpus.sources.visual_genome import read_visual_genome

        return read_visual_genome(source.regions, source.images, source.image_data, source_dir, source.separator,
                                  source.max_phrases)
    from cnclip.corpus.sources.cn_clip import read_cn_clip

    return read_cn_clip(source.path, source.split, source_dir)


def _stamp(source: CocoSource | VisualGenomeSource | CnClipSource) -> str:
    """What the folder was read from: the source's settings and its annotation files' listing."""
    from cnclip.corpus.runtime.fingerprints import input_listing
    from cnclip.corpus.runtime.state import fingerprint
    from cnclip.corpus.sources import source_inputs

    return fingerprint(source.model_dump(mode="json"), input_listing(source_inputs(source)))


def _current(source_dir: Path, stamp: str) -> None:
    """Keep the folder if it was read from the same inputs (an interrupted read keeps the images
    it stored); otherwise empty it (the build's own folder: links and copies) and stamp it."""
    import shutil

    from cnclip._common.atomic import write_json_atomic

    marker = source_dir / "source.json"
    try:
        same = json.loads(marker.read_text(encoding="utf-8")).get("stamp") == stamp
    except (OSError, ValueError, AttributeError):
        same = False
    if not same:
        if source_dir.exists():
            shutil.rmtree(source_dir)
        write_json_atomic(marker, {"stamp": stamp})


def prepare_format_source(source: CocoSource | VisualGenomeSource | CnClipSource,
                          sources_dir: Path) -> tuple[list[str], dict]:
    """[rows.parquet] and its report (rows, bad rows). A rows file that exists is whole and is
    reused while the source's settings and annotation files are those it was read from."""
    source_dir = Path(sources_dir) / source.name
    _current(source_dir, _stamp(source))
    path = rows_path(source_dir)
    if not path.exists():
        write_rows(read_format_source(source, source_dir), source_dir)
    counts = pl.scan_parquet(path).select(pl.len().alias("rows"), pl.col("reason").is_not_null().sum().alias("bad"))
    rows, bad = counts.collect().row(0)
    return [str(path)], {"rows": rows, "bad_rows": int(bad)}
