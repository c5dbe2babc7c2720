"""pHashes of evaluation image sets, for decontamination.

Training pHashes are of the stored images (resized and cropped by img2dataset), so evaluation
images go through img2dataset's own Resizer with the same image settings before hashing:
otherwise a centre crop alone would move the hash further than any near-duplicate threshold.
A pHash list (`cnclip corpus hash-eval`) records the settings it was made with and lets users
share decontamination lists without sharing images.
"""

from __future__ import annotations

import glob
import io
import json
from pathlib import Path
from typing import Iterator

import polars as pl
import pyarrow.parquet as pq

from cnclip._common.errors import CnclipError
from cnclip.corpus.ops.phash import IMAGE_EXTENSIONS, from_hex, iter_tar_images, phash_bytes, to_hex
from cnclip.corpus.recipe import ImageSettings
from cnclip.corpus.runtime import storage

_METADATA_KEY = b"cnclip.eval_hashes"


class EvalSetError(CnclipError, ValueError):
    """An evaluation set that cannot be read; the message names the path."""


def _resizer(image: ImageSettings):
    from img2dataset.resizer import Resizer

    return Resizer(
        image_size=image.size, resize_mode=image.resize_mode, resize_only_if_bigger=False,
        encode_format=image.encode_format, encode_quality=image.encode_quality,
    )


def _iter_remote_images(path: str) -> Iterator[tuple[str, bytes]]:
    """iter_eval_images of an fsspec URL: the same ids, files read through fsspec (a tar is
    copied to a local temporary file first, as the tar reader streams a local file)."""
    import tempfile

    if storage.is_dir(path):
        for name in storage.list_files(path, recursive=True):
            if name.lower().endswith(IMAGE_EXTENSIONS):
                yield name.removeprefix(path.rstrip("/") + "/"), storage.read_bytes(name)
        return
    tars = storage.list_files(path)
    if not tars:
        raise EvalSetError(f"{path}: no such folder, tar or glob of tars")
    for tar in tars:
        with tempfile.TemporaryDirectory(prefix="cnclip-eval-") as scratch:
            local = Path(scratch) / "set.tar"
            local.write_bytes(storage.read_bytes(tar))
            for key, data in iter_tar_images(local):
                yield f"{tar.rpartition('/')[2]}/{key}", data


def iter_eval_images(path: str) -> Iterator[tuple[str, bytes]]:
    """(id, bytes) from a folder of images (recursive), or WebDataset tars (a path or a glob)."""
    if storage.is_url(path):
        yield from _iter_remote_images(path)
        return
    folder = Path(path)
    if folder.is_dir():
        for file in sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS):
            yield str(file.relative_to(folder)), file.read_bytes()
        return
    tars = sorted(glob.glob(path)) if glob.has_magic(path) else ([path] if folder.is_file() else [])
    if not tars:
        raise EvalSetError(f"{path}: no such folder, tar or glob of tars")
    for tar in tars:
        for key, data in iter_tar_images(Path(tar)):
            yield f"{Path(tar).name}/{key}", data


def hash_eval_images(path: str, image: ImageSettings) -> pl.DataFrame:
    """id, phash (UInt64) of every image in an evaluation set, resized like training images."""
    resizer = _resizer(image)
    ids: list[str] = []

    def stored() -> Iterator[bytes]:
        for image_id, data in iter_eval_images(path):
            encoded, *_, error = resizer(io.BytesIO(data))
            if encoded is None:
                raise EvalSetError(f"{path}: {image_id}: cannot be decoded ({error})")
            ids.append(image_id)
            yield encoded

    hashes = phash_bytes(stored())
    return pl.DataFrame({"id": ids, "phash": hashes}, schema={"id": pl.String, "phash": pl.UInt64})


def write_eval_hashes(path: str, out: Path, image: ImageSettings) -> int:
    """Hash an evaluation set into a shareable Parquet list (id, phash as imagehash hex)."""
    try:
        frame = hash_eval_images(path, image)
    except OSError as err:  # an unreadable image or tar in the set
        raise EvalSetError(f"{err.filename or path}: cannot read ({err.strerror or err})") from None
    table = frame.with_columns(pl.Series("phash", to_hex(frame["phash"].to_numpy()))).to_arrow()
    settings = {"size": image.size, "resize_mode": image.resize_mode, "source": str(path)}
    table = table.replace_schema_metadata({_METADATA_KEY: json.dumps(settings).encode()})
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, out)
    except OSError as err:
        raise EvalSetError(f"{out}: cannot write the pHash list ({getattr(err, 'strerror', None) or err})") from None
    return frame.height


def read_eval_hashes(path: str, image: ImageSettings) -> pl.DataFrame:
    """A pHash list written by write_eval_hashes; refuses one made with other image settings."""
    try:
        table = pq.read_table(io.BytesIO(storage.read_bytes(path)) if storage.is_url(path) else path)
    except (OSError, ValueError) as err:  # pyarrow's ArrowInvalid (not Parquet) is a ValueError
        raise EvalSetError(f"{path}: cannot read the pHash list ({str(err).splitlines()[0] if str(err) else err!r})"
                           ) from None
    settings = json.loads((table.schema.metadata or {}).get(_METADATA_KEY, b"{}"))
    made_with = (settings.get("size"), settings.get("resize_mode"))
    if settings and made_with != (image.size, image.resize_mode):
        raise EvalSetError(f"{path}: hashed at size {made_with[0]} with {made_with[1]}, but the recipe stores "
                           f"images at {image.size} with {image.resize_mode}; rehash it with those settings")
    frame = pl.from_arrow(table)
    if not {"id", "phash"} <= set(frame.columns):
        raise EvalSetError(f"{path}: a pHash list needs columns id and phash")
    hashes = from_hex(frame["phash"]) if frame["phash"].dtype == pl.String else frame["phash"].to_numpy()
    return pl.DataFrame({"id": frame["id"].cast(pl.String), "phash": hashes},
                        schema={"id": pl.String, "phash": pl.UInt64})


def load_eval_hashes(paths: list[str], image: ImageSettings) -> pl.DataFrame:
    """Every evaluation set of a recipe, ids prefixed with their set's path."""
    frames = []
    for path in paths:
        try:
            frame = read_eval_hashes(path, image) if path.endswith(".parquet") else hash_eval_images(path, image)
        except OSError as err:  # an unreadable image or tar in the set
            raise EvalSetError(f"{err.filename or path}: cannot read ({err.strerror or err})") from None
        frames.append(frame.with_columns((pl.lit(f"{path}:") + pl.col("id")).alias("id")))
    return pl.concat(frames) if frames else pl.DataFrame(schema={"id": pl.String, "phash": pl.UInt64})
