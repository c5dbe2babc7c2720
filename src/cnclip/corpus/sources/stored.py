"""What the dataset readers (coco.py, visual_genome.py, cn_clip.py) share: the images they store
under the build's work/sources/<name>/ and the rows file they write beside them.

A local or base64 image is written there once (atomically; a file that exists is whole and is
reused by a rerun) and its row gets a file:// URL into that folder, which the build allows
without the user listing it in download.allow_local_files: it is the build's own folder. The
download stage then reads, resizes, hashes and deduplicates it like a web image.

The rows file (`rows.parquet`) is written last, also atomically, so a rerun that finds it skips
the whole reading. Its rows are in input order; a row that cannot be used carries ingest's
`reason` (ingest:bad_row) and a `detail` naming the file and line or entry.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Iterable, Iterator

import polars as pl

from cnclip._common.atomic import atomic_path
from cnclip.corpus.sources.metadata import SourceError
from cnclip.corpus.sources.rows import BAD_ROW

_DETAIL_CHARS = 200
# Leading bytes of the image formats a dataset ships, to name the stored file as a server would.
_SIGNATURES = ((b"\xff\xd8\xff", ".jpg"), (b"\x89PNG\r\n\x1a\n", ".png"), (b"GIF87a", ".gif"), (b"GIF89a", ".gif"),
               (b"BM", ".bmp"))


def images_dir(source_dir: Path) -> Path:
    return source_dir / "images"


def rows_path(source_dir: Path) -> Path:
    return source_dir / "rows.parquet"


def image_extension(data: bytes) -> str:
    """The file extension a stored image is named with (Content-Type of the file:// answer)."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return ".webp"
    for signature, extension in _SIGNATURES:
        if data.startswith(signature):
            return extension
    return ".img"


def file_url(path: Path) -> str:
    """An absolute file:// URL (percent-encoded), as the download guard reads it back."""
    return Path(os.path.abspath(path)).as_uri()


def store_bytes(folder: Path, stem: str, data: bytes) -> Path:
    """An image's bytes as `folder/stem.ext`, written once."""
    target = folder / f"{stem}{image_extension(data)}"
    if not target.exists():
        with atomic_path(target) as tmp:
            tmp.write_bytes(data)
    return target


def store_file(folder: Path, stem: str, original: Path) -> Path:
    """A user's image file in the build's folder: a hard link where the filesystem allows (no
    copy of a large dataset; the user's file is never written to), else a copy; written once."""
    target = folder / f"{stem}{original.suffix.lower() or '.img'}"
    if target.exists():
        return target
    with atomic_path(target) as tmp:
        try:
            os.link(original, tmp)
        except OSError:
            shutil.copyfile(original, tmp)
    return target


def bad_detail(text: str) -> str:
    return text[:_DETAIL_CHARS]


def rows_frame(urls: list, captions: list, image_ids: list, reasons: list, details: list,
               extra: dict[str, tuple[list, pl.DataType]] | None = None) -> pl.DataFrame:
    """The rows file's frame: url, caption_raw, image_id, the readers' own columns, reason, detail."""
    columns: dict[str, tuple[list, pl.DataType]] = {
        "url": (urls, pl.String), "caption_raw": (captions, pl.String), "image_id": (image_ids, pl.Int64),
        **(extra or {}), "reason": (reasons, pl.String), "detail": (details, pl.String)}
    return pl.DataFrame({name: values for name, (values, _) in columns.items()},
                        schema={name: dtype for name, (_, dtype) in columns.items()})


class RowsBuilder:
    """Rows collected in input order: good ones with a URL, bad ones with ingest:bad_row."""

    def __init__(self, *extra: str):
        self.urls: list[str | None] = []
        self.captions: list[str | None] = []
        self.image_ids: list[int | None] = []
        self.reasons: list[str | None] = []
        self.details: list[str | None] = []
        self.extra: dict[str, list] = {name: [] for name in extra}

    def add(self, url: str | None, caption: object, image_id: int | None, problem: str | None = None,
            reason: str = BAD_ROW, **extra: object) -> None:
        """One row; with `problem` (the detail) it is a bad row of `reason`."""
        self.urls.append(url if problem is None else None)
        self.captions.append(caption if isinstance(caption, str) else None)
        self.image_ids.append(image_id if isinstance(image_id, int) and not isinstance(image_id, bool) else None)
        self.reasons.append(None if problem is None else reason)
        self.details.append(None if problem is None else bad_detail(problem))
        for name, values in self.extra.items():
            value = extra.get(name)
            values.append(value if isinstance(value, int) and not isinstance(value, bool) else None)

    def frame(self) -> pl.DataFrame:
        extra = {name: (values, pl.Int64) for name, values in self.extra.items()}
        return rows_frame(self.urls, self.captions, self.image_ids, self.reasons, self.details, extra)


def write_rows(frame: pl.DataFrame, source_dir: Path) -> str:
    from cnclip.corpus.runtime.state import write_parquet_atomic

    path = rows_path(source_dir)
    write_parquet_atomic(frame, path)
    return str(path)


def load_json(path: str, what: str) -> object:
    """A dataset's JSON file, or a one-line error naming it."""
    import json

    try:
        with open(path, "rb") as handle:
            return json.load(handle)
    except OSError as err:
        raise SourceError(f"{path}: cannot read the {what} ({err.strerror})") from None
    except (ValueError, RecursionError) as err:
        raise SourceError(f"{path}: not valid JSON ({str(err).splitlines()[0]})") from None


def streamed_entries(path: str, what: str) -> Iterator[tuple[int, dict]]:
    """(index, object) for each entry of a file whose top level is a list of JSON objects, parsed
    entry by entry: memory holds one entry, not the file (Visual Genome's region descriptions are
    one ~700 MB list). Errors are the one-line ones of `load_json` and `entries`, met as the
    reading reaches them."""
    import ijson

    try:
        with open(path, "rb") as handle:
            events = ijson.parse(handle)
            first = next(events, None)
            if first is None or first[1] != "start_array":
                raise SourceError(f"{path}: the top level is not a list")
        with open(path, "rb") as handle:
            for index, item in enumerate(ijson.items(handle, "item", use_float=True)):
                if not isinstance(item, dict):
                    raise SourceError(f"{path}: [{index}] is not a JSON object")
                yield index, item
    except OSError as err:
        raise SourceError(f"{path}: cannot read the {what} ({err.strerror})") from None
    except ijson.JSONError as err:
        raise SourceError(f"{path}: not valid JSON ({str(err).splitlines()[0]})") from None


def entries(data: object, path: str, key: str | None) -> list:
    """`data[key]` (or data itself) as a list of JSON objects; a one-line error naming the file
    and the key otherwise."""
    if key is not None:
        if not isinstance(data, dict):
            raise SourceError(f"{path}: expected a JSON object with key {key!r}")
        if key not in data:
            raise SourceError(f"{path}: no key {key!r}")
        data = data[key]
    where = key or "the top level"
    if not isinstance(data, list):
        raise SourceError(f"{path}: {where} is not a list")
    for index, item in enumerate(data):
        if not isinstance(item, dict):
            raise SourceError(f"{path}: {key or ''}[{index}] is not a JSON object")
    return data


def required(item: dict, path: str, where: str, *keys: str) -> object:
    """The first of `keys` the JSON object has; a one-line error naming the file and key if none."""
    for key in keys:
        if key in item:
            return item[key]
    raise SourceError(f"{path}: {where} has no key {keys[0]!r}")


def integer_id(value: object) -> int | None:
    """A JSON image id as an int (a number or a decimal string), or None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value.strip())
    return None


def index_folder(folder: Path, suffixes: Iterable[str] = (".jpg", ".jpeg", ".png", ".webp")) -> dict[str, Path]:
    """Image files under `folder` (subfolders too) by their stem, the first in sorted order."""
    wanted = {s.lower() for s in suffixes}
    found: dict[str, Path] = {}
    for path in sorted(folder.rglob("*")):
        if path.suffix.lower() in wanted and path.stem not in found and path.is_file():
            found[path.stem] = path
    return found


def own_image_root(recipe) -> Path | None:
    """The build's work/sources/ folder, absolute, when one of its sources stores images there
    (the download reads them as file:// URLs, allowed without download.allow_local_files)."""
    if not any(getattr(source, "stores_images", False) for source in recipe.sources):
        return None
    from cnclip.corpus.runtime.layout import BuildLayout

    return Path(os.path.abspath(BuildLayout.of(recipe).sources_dir))
