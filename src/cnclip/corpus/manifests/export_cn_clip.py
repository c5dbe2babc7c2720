"""A built corpus in Chinese-CLIP's finetuning layout, ready for its LMDB builder
(`cn_clip/preprocess/build_lmdb_dataset.py --data_dir OUT --splits train,valid`):

    OUT/{split}_imgs.tsv         "{image_id}\\t{base64 of the image bytes as stored in the shard}"
    OUT/{split}_texts.jsonl      {"text_id": int, "text": caption, "image_ids": [image_id]} per sample
    OUT/{split}_ids.parquet      text_id, image_id -> the manifest's uid, key, shard, sha256
    OUT/cnclip_cn_clip_export.json   what this export wrote (so a rerun replaces only its own files)

Ids are deterministic: `text_id` numbers the samples in uid order (the manifests' order) from 0;
samples whose images share a sha256 are one image, written once, whose `image_id` numbers the
images by the lowest uid among their samples. A `--valid-fraction` split goes by image (every
text of an image lands in the image's split), chosen by a seeded hash of that lowest uid, so the
same corpus and seed always give the same split. Images are streamed shard by shard: one shard's
id rows and captions are in memory at a time, plus the id table (a few integers per sample).
"""

from __future__ import annotations

import base64
import json
import re
import tarfile
from contextlib import ExitStack
from pathlib import Path
from typing import Union

import numpy as np
import polars as pl

from cnclip._common.atomic import atomic_path, write_json_atomic
from cnclip._common.errors import CnclipError
from cnclip.corpus.manifests.members import sample_key
from cnclip.corpus.runtime.state import write_parquet_atomic

MARKER = "cnclip_cn_clip_export.json"
FORMAT = "cnclip-cn-clip-export-1"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
SPLIT_NAME = re.compile(r"[a-z][a-z0-9_]*")


class CnClipExportError(CnclipError, ValueError):
    """The corpus cannot be read as a finished build, or OUT is not the export's to write."""


def split_files(split: str) -> list[str]:
    return [f"{split}_imgs.tsv", f"{split}_texts.jsonl", f"{split}_ids.parquet"]


def _previous_files(out: Path) -> list[str]:
    """The files an earlier export wrote in `out` ([] for a missing or empty folder); a folder
    holding anything else is the user's, and is refused rather than mixed into."""
    if out.exists() and not out.is_dir():
        raise CnClipExportError(f"{out}: is a file, not a folder for the export")
    if not out.is_dir() or not any(out.iterdir()):
        return []
    try:
        record = json.loads((out / MARKER).read_text(encoding="utf-8"))
        if record.get("format") == FORMAT:
            return [name for name in record.get("files", []) if isinstance(name, str) and "/" not in name]
    except (OSError, ValueError, AttributeError):
        pass
    raise CnClipExportError(f"{out}: not empty and not a previous cn_clip export (no {MARKER}); "
                            "choose an empty or new folder")


def _samples(manifest_dir: Path) -> pl.LazyFrame:
    parts = sorted((manifest_dir / "samples").glob("*.parquet"))
    if not parts:
        raise CnClipExportError(f"{manifest_dir}/samples: no manifest parts (not a finished build)")
    return pl.scan_parquet(parts)


def _splitmix64(values: np.ndarray) -> np.ndarray:
    """A fixed 64-bit mix (SplitMix64's finalizer): the same split on every platform and version."""
    with np.errstate(over="ignore"):
        z = values.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def assign_ids(samples: pl.LazyFrame, split: str, valid_fraction: float, seed: int) -> pl.DataFrame:
    """text_id, image_id and split of every sample (columns text_id, image_id, split, uid, key,
    shard, sha256), in uid order. A sample without a sha256 is an image of its own."""
    frame = (samples.select("uid", "key", "shard", "sha256").sort("uid")
             .with_columns(pl.col("sha256").fill_null(pl.lit("uid:") + pl.col("uid").cast(pl.String)))
             .with_columns(pl.col("uid").min().over("sha256").alias("image_uid"))
             .with_columns(pl.int_range(pl.len(), dtype=pl.Int64).alias("text_id"),
                           (pl.col("image_uid").rank("dense").cast(pl.Int64) - 1).alias("image_id"))
             .collect())
    in_valid = np.zeros(frame.height, dtype=bool)
    if valid_fraction > 0:
        mixed = _splitmix64(frame["image_uid"].to_numpy() ^ np.int64(seed))
        in_valid = mixed < np.uint64(int(valid_fraction * 2.0**64))
    return frame.with_columns(
        pl.when(pl.Series(in_valid)).then(pl.lit("valid")).otherwise(pl.lit(split)).alias("split"),
        (pl.col("uid") == pl.col("image_uid")).alias("first"),
    ).select("text_id", "image_id", "split", "uid", "key", "shard", "sha256", "first")


def _text_lines(rows: pl.DataFrame) -> str:
    """Chinese-CLIP's JSONL lines of these rows (built by polars, not a Python loop per row)."""
    lines = rows.select(pl.struct(pl.col("text_id"), pl.col("caption").alias("text"),
                                  pl.concat_list(pl.col("image_id")).alias("image_ids")).struct.json_encode())
    return "".join(line + "\n" for line in lines.to_series())


def _shard_images(tar_path: Path, wanted: dict[str, int]) -> dict[str, tuple[int, bytes]]:
    """key -> (image_id, image bytes) of the `wanted` keys' images, read from one pass over the tar."""
    found: dict[str, tuple[int, bytes]] = {}
    try:
        with tarfile.open(tar_path, "r|") as tar:  # streaming: members in order, nothing indexed
            for member in tar:
                key = sample_key(member.name)
                if member.isfile() and key in wanted and member.name.lower().endswith(IMAGE_SUFFIXES):
                    found[key] = (wanted[key], tar.extractfile(member).read())
    except (OSError, tarfile.TarError) as err:
        raise CnClipExportError(f"{tar_path}: cannot read the shard ({err})") from None
    if missing := sorted(set(wanted) - set(found)):
        raise CnClipExportError(f"{tar_path}: no image member for sample {missing[0]} "
                                f"({len(missing)} missing; the shard and samples/ disagree)")
    return found


def _write_shard(manifest_dir: Path, tar_path: Path, rows: pl.DataFrame, streams: dict) -> None:
    shard = int(rows["shard"][0])
    captions = pl.read_parquet(manifest_dir / "samples" / f"{shard:05d}.parquet", columns=["uid", "caption"])
    rows = rows.join(captions, on="uid", how="left").sort("uid")
    if rows["caption"].null_count():
        raise CnClipExportError(f"{manifest_dir}/samples/{shard:05d}.parquet: lacks the captions of shard {shard}")
    firsts = rows.filter(pl.col("first"))
    images = _shard_images(tar_path, dict(zip(firsts["key"].to_list(), firsts["image_id"].to_list(), strict=True)))
    for split, key in firsts.select("split", "key").iter_rows():  # one image each: read from the tar anyway
        image_id, data = images[key]
        streams[split][0].write(f"{image_id}\t{base64.b64encode(data).decode('ascii')}\n")
    for (split,), part in rows.group_by("split", maintain_order=True):
        streams[split][1].write(_text_lines(part))


def _check_args(split: str, valid_fraction: float) -> list[str]:
    if not SPLIT_NAME.fullmatch(split):
        raise CnClipExportError(f"--split: {split!r} is not a split name (lowercase letters, digits, _)")
    if not 0 <= valid_fraction < 1:
        raise CnClipExportError(f"--valid-fraction: {valid_fraction} is not in [0, 1)")
    if valid_fraction > 0 and split == "valid":
        raise CnClipExportError("--split valid with --valid-fraction: the held-out split is already named valid")
    return [split, "valid"] if valid_fraction > 0 else [split]


def export_cn_clip(manifest_dir: Union[str, Path], out: Union[str, Path], split: str = "train",
                   valid_fraction: float = 0.0, seed: int = 0) -> dict[str, dict[str, int]]:
    """Write the corpus at `manifest_dir` into `out` in Chinese-CLIP's layout; returns
    {split: {"images": n, "texts": n}}. `out` must be new, empty or an earlier export (whose
    files are replaced; nothing else in it is touched)."""
    from cnclip.search.shards import shards_dir

    manifest_dir, out = Path(manifest_dir), Path(out)
    splits = _check_args(split, valid_fraction)
    previous = _previous_files(out)
    folder = shards_dir(manifest_dir)
    ids = assign_ids(_samples(manifest_dir), split, valid_fraction, seed)
    try:
        out.mkdir(parents=True, exist_ok=True)
        with ExitStack() as stack:
            streams = {name: [stack.enter_context(open(stack.enter_context(atomic_path(out / f)), "w",
                                                       encoding="utf-8", newline="\n"))
                              for f in split_files(name)[:2]] for name in splits}
            for (shard,), rows in ids.group_by("shard", maintain_order=True):
                _write_shard(manifest_dir, folder / f"{shard:05d}.tar", rows, streams)
        for name in splits:
            write_parquet_atomic(ids.filter(pl.col("split") == name).drop("split", "first"),
                                 out / f"{name}_ids.parquet")
        written = [f for name in splits for f in split_files(name)]
        for stale in sorted(set(previous) - set(written) - {MARKER}):
            (out / stale).unlink(missing_ok=True)  # an earlier export's split that this one no longer has
        counts = {name: {"images": int(ids.filter(pl.col("split") == name)["first"].sum()),
                         "texts": int((ids["split"] == name).sum())} for name in splits}
        write_json_atomic(out / MARKER, {"format": FORMAT, "files": written, "splits": counts,
                                         "split": split, "valid_fraction": valid_fraction, "seed": seed})
    except OSError as err:
        raise CnClipExportError(f"{out}: cannot write the export ({err.strerror or err})") from None
    return counts
