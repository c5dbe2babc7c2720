"""COCO captions JSON (`captions_train2014.json` and the like; COCO-CN's own JSON too): one row
per caption, several per image, `image_id` kept.

The file is `{"images": [{"id", "file_name", "coco_url", "flickr_url", ...}], "annotations":
[{"id", "image_id", "caption"}]}`. Images come from a local folder (`file_name` in it, stored
under the build's folder, see stored.py) or, with `images: url`, from each image's `coco_url`
(else `flickr_url`). A missing key is a one-line error naming the file and the entry; a caption
whose image is not listed, has no file or no URL, or that is not text is a rejected row.
"""

from __future__ import annotations

import os
from pathlib import Path

import polars as pl

from cnclip.corpus.recipe.sources_formats import IMAGES_FROM_URLS
from cnclip.corpus.sources.metadata import SourceError
from cnclip.corpus.sources.rows import CAPTION_NOT_TEXT
from cnclip.corpus.sources.stored import (
    RowsBuilder,
    entries,
    file_url,
    images_dir,
    integer_id,
    load_json,
    required,
    store_file,
)


def _image_entries(images: list, path: str) -> dict[int, tuple[int, dict]]:
    """Image id -> (its index in `images`, the entry); a repeated id keeps its first entry."""
    found: dict[int, tuple[int, dict]] = {}
    for index, item in enumerate(images):
        raw = required(item, path, f"images[{index}]", "id")
        image_id = integer_id(raw)
        if image_id is None:
            raise SourceError(f"{path}: images[{index}].id is not an integer (got {str(raw)[:40]!r})")
        found.setdefault(image_id, (index, item))
    return found


class _Locator:
    """Where each image's bytes come from, worked out (and the local file stored) once per image."""

    def __init__(self, path: str, images: str, source_dir: Path):
        self.path, self.images = path, images
        self.folder = None if images == IMAGES_FROM_URLS else Path(images)
        self.store = images_dir(source_dir)
        self.done: dict[int, tuple[str | None, str | None]] = {}

    def __call__(self, image_id: int, index: int, item: dict) -> tuple[str | None, str | None]:
        """(url, None) or (None, why there is no image)."""
        if image_id not in self.done:
            self.done[image_id] = self._locate(image_id, index, item)
        return self.done[image_id]

    def _locate(self, image_id: int, index: int, item: dict) -> tuple[str | None, str | None]:
        if self.folder is None:
            for key in ("coco_url", "flickr_url"):
                url = item.get(key)
                if isinstance(url, str) and url.strip():
                    return url.strip(), None
            return None, f"images[{index}] (id {image_id}) has no coco_url or flickr_url"
        name = required(item, self.path, f"images[{index}]", "file_name")
        if not isinstance(name, str) or not name:
            raise SourceError(f"{self.path}: images[{index}].file_name is not a file name")
        original = self.folder / name
        # A file_name may not climb out of the images folder (a crafted JSON naming ../../x).
        inside = Path(os.path.realpath(original)).is_relative_to(os.path.realpath(self.folder))
        if not inside or not original.is_file():
            return None, f"images[{index}] (id {image_id}): no file {name[:80]!r} in {self.images}"
        return file_url(store_file(self.store, str(image_id), original)), None


def read_coco(annotations: str, images: str, source_dir: Path) -> pl.DataFrame:
    """The captions JSON -> rows (url, caption_raw, image_id, reason, detail) in annotation
    order; local images stored under `source_dir`."""
    data = load_json(annotations, "COCO captions JSON")
    image_entries = _image_entries(entries(data, annotations, "images"), annotations)
    captions = entries(data, annotations, "annotations")
    locate = _Locator(annotations, images, source_dir)
    name = Path(annotations).name
    rows = RowsBuilder()
    for index, item in enumerate(captions):
        where = f"annotations[{index}]"
        raw_id = required(item, annotations, where, "image_id")
        caption = required(item, annotations, where, "caption")
        image_id = integer_id(raw_id)
        if image_id is None:
            rows.add(None, caption, None, f"{name}: {where}: image_id {str(raw_id)[:40]!r} is not an integer")
        elif image_id not in image_entries:
            rows.add(None, caption, image_id, f"{name}: {where}: image_id {image_id} is not in images")
        elif not isinstance(caption, str):
            rows.add(None, None, image_id, f"{name}: {where}: caption is not a string", reason=CAPTION_NOT_TEXT)
        else:
            url, problem = locate(image_id, *image_entries[image_id])
            rows.add(url, caption, image_id, None if problem is None else f"{name}: {where}: {problem}")
    return rows.frame()
