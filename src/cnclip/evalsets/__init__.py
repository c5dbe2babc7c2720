"""Evaluation sets from the published datasets (COCO captions JSON, Chinese-CLIP's layout: MUGE,
Flickr30K-CN, COCO-CN), written in clip_benchmark's WebDataset layout:

    DIR/dataset_type.txt          "retrieval"
    DIR/{split}/nshards.txt       the number of shards n
    DIR/{split}/0.tar ... n-1     {key}.jpg|png|webp (the image file's own bytes) + {key}.txt
    DIR/{split}/sizes.json        {"0.tar": samples, ...} (what cnclip's shard counting reads)
    DIR/{split}/phashes.parquet   the images' pHash list, for a recipe's dedup.eval_images

One sample per image, ALL its captions as the lines of `{key}.txt`: Chinese-CLIP's retrieval
definition (a text query hits when it retrieves any image it describes; an image query when it
retrieves any of its captions). `cnclip eval --data 'DIR/test/*.tar'` and clip_benchmark's
`build_wds_dataset(..., data_dir=DIR, split="test")` read it. The sets are read by the same
readers as the source kinds (corpus/sources/coco.py, cn_clip.py), so an input a build rejects
is left out here too, and counted.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from cnclip._common.atomic import atomic_path, write_text_atomic
from cnclip._common.errors import CnclipError
from cnclip.corpus.recipe import ImageSettings
from cnclip.corpus.recipe.sources_formats import CN_CLIP_KINDS, IMAGES_FROM_URLS

EVALSET_KINDS = ("coco", *CN_CLIP_KINDS)
PHASH_LIST = "phashes.parquet"
_STORED_FORMATS = {"jpeg": "jpg", "png": "png", "webp": "webp"}  # PIL's format -> the member's extension


class EvalSetWriteError(CnclipError, ValueError):
    """An evaluation set that cannot be written as asked; the message names the input or folder."""


@dataclass
class EvalSetSummary:
    images: int = 0
    captions: int = 0
    shards: int = 0
    skipped: int = 0  # input rows left out (their first reasons below)
    skipped_details: list[str] = field(default_factory=list)


def check_inputs(kind: str, path: str, split: str, images: str | None) -> None:
    """The files a set is read from, checked before anything is written."""
    if kind not in EVALSET_KINDS:
        raise EvalSetWriteError(f"kind: expected one of {', '.join(EVALSET_KINDS)} (got {kind!r})")
    if kind == "coco":
        if not images or images == IMAGES_FROM_URLS:
            raise EvalSetWriteError("coco: --images must name the folder holding the images (an evaluation "
                                    "set is written from local images)")
        if not Path(images).is_dir():
            raise EvalSetWriteError(f"--images: no such folder {images!r}")
        if not Path(path).is_file():
            raise EvalSetWriteError(f"coco: no such file {path!r}")
        return
    from cnclip.corpus.sources.cn_clip import split_files

    for file in split_files(path, split):
        if not file.is_file():
            raise EvalSetWriteError(f"{kind}: no such file {str(file)!r} (split {split})")


def read_pairs(kind: str, path: str, split: str, images: str | None, scratch: Path) -> pl.DataFrame:
    """The set's (url, caption_raw, image_id, reason, detail) rows, images stored in `scratch`."""
    from cnclip.corpus.sources.metadata import SourceError

    try:
        if kind == "coco":
            from cnclip.corpus.sources.coco import read_coco

            return read_coco(path, images, scratch)
        from cnclip.corpus.sources.cn_clip import read_cn_clip

        return read_cn_clip(path, split, scratch)
    except SourceError as err:
        raise EvalSetWriteError(str(err)) from None


def _image_member(data: bytes) -> tuple[str, bytes] | None:
    """(extension, bytes) of an image as a member: the file as it is when it is a JPEG, PNG or
    WebP (named by what it is, not by its file name), else re-encoded as PNG; None when it cannot
    be decoded."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as opened:
            opened.load()
            if (opened.format or "").lower() in _STORED_FORMATS:
                return _STORED_FORMATS[opened.format.lower()], data
            buffer = io.BytesIO()
            opened.convert("RGB").save(buffer, format="PNG")
            return "png", buffer.getvalue()
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        return None


def _grouped(rows: pl.DataFrame) -> pl.DataFrame:
    """Usable rows -> one row per image (first appearance order): its url and caption lines."""
    caption = pl.col("caption_raw").str.replace_all(r"\s+", " ").str.strip_chars()
    return (rows.filter(pl.col("reason").is_null() & pl.col("url").is_not_null())
            .with_columns(caption.alias("caption"), pl.int_range(pl.len()).alias("_order"))
            .filter(pl.col("caption") != "")
            .group_by("image_id", maintain_order=True)
            .agg(pl.col("url").first(), pl.col("caption").unique(maintain_order=True), pl.col("_order").min())
            .sort("_order"))


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tar.addfile(info, io.BytesIO(data))


def _write_shards(images: pl.DataFrame, folder: Path, per_shard: int, summary: EvalSetSummary) -> dict[str, int]:
    """The tars (each written whole, then renamed into place); their sample counts by name."""
    from cnclip.corpus.net.local_files import local_path

    sizes: dict[str, int] = {}
    shard = 0
    pending = list(images.iter_rows(named=True))
    while pending:
        chunk, pending = pending[:per_shard], pending[per_shard:]
        name = f"{shard}.tar"
        count = 0
        with atomic_path(folder / name) as tmp, tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
            for row in chunk:
                stored = Path(local_path(row["url"]))
                member = _image_member(stored.read_bytes())
                if member is None:
                    summary.skipped += len(row["caption"])
                    summary.skipped_details.append(f"image {row['image_id']}: cannot be decoded")
                    continue
                key = str(row["image_id"])
                _add(tar, f"{key}.{member[0]}", member[1])
                _add(tar, f"{key}.txt", "\n".join(row["caption"]).encode("utf-8"))
                count += 1
                summary.captions += len(row["caption"])
        sizes[name] = count
        summary.images += count
        shard += 1
    return sizes


def write_evalset(kind: str, path: str, out: Path, split: str = "test", images: str | None = None,
                  samples_per_shard: int = 1000, image: ImageSettings | None = None) -> EvalSetSummary:
    """Write DIR/{split}/ (refused if it exists: it may be the user's) and DIR/dataset_type.txt."""
    from cnclip.corpus.ops.eval_hashes import write_eval_hashes

    check_inputs(kind, path, split, images)
    target = Path(out) / split
    if target.exists():
        raise EvalSetWriteError(f"{target}: already exists; remove it or choose another --out")
    Path(out).mkdir(parents=True, exist_ok=True)
    summary = EvalSetSummary()
    with tempfile.TemporaryDirectory(prefix=f".{split}.", dir=out) as scratch:
        rows = read_pairs(kind, path, split, images, Path(scratch) / "read")
        bad = rows.filter(pl.col("reason").is_not_null())
        summary.skipped, summary.skipped_details = bad.height, bad["detail"].head(3).to_list()
        grouped = _grouped(rows)
        if grouped.height == 0:
            raise EvalSetWriteError(f"{path}: no image with a usable caption in split {split!r}")
        staging = Path(scratch) / "split"
        staging.mkdir()
        sizes = _write_shards(grouped, staging, samples_per_shard, summary)
        summary.shards = len(sizes)
        write_text_atomic(staging / "nshards.txt", f"{len(sizes)}\n")
        write_text_atomic(staging / "sizes.json", json.dumps(sizes, indent=2))
        write_eval_hashes(str(staging / "*.tar"), staging / PHASH_LIST, image or ImageSettings())
        os.replace(staging, target)
    write_text_atomic(Path(out) / "dataset_type.txt", "retrieval\n")
    return summary
