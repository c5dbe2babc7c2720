"""Visual Genome region descriptions: one row per image, its region phrases joined into one
caption (distinct phrases, stripped, in file order, joined with the source's `separator`), as
the Chinese CLIP paper made one text of an image's descriptions. `image_id` is kept.

`region_descriptions.json` is a list of `{"id": image_id, "regions": [{"phrase", ...}]}`; the
images come from a folder (`{image_id}.jpg` in it or its subfolders, VG_100K/ and VG_100K_2/ as
distributed) or, with `images: url`, from `image_data.json`'s `url` per `image_id`. A missing
key is a one-line error naming the file and the entry; an image with no phrase, no file or no
URL is a rejected row. Both JSON files are read entry by entry (the region descriptions are one
~700 MB list), so memory holds the rows, not the parsed file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import polars as pl

from cnclip.corpus.recipe.sources_formats import IMAGES_FROM_URLS
from cnclip.corpus.sources.metadata import SourceError
from cnclip.corpus.sources.stored import (
    RowsBuilder,
    file_url,
    images_dir,
    index_folder,
    integer_id,
    required,
    store_file,
    streamed_entries,
)


def joined_phrases(regions: list, path: str, where: str, separator: str, max_phrases: Optional[int]) -> str:
    """An image's caption: its distinct non-empty phrases, in order (the first max_phrases)."""
    phrases: dict[str, None] = {}
    for number, region in enumerate(regions):
        if not isinstance(region, dict):
            raise SourceError(f"{path}: {where}.regions[{number}] is not a JSON object")
        phrase = required(region, path, f"{where}.regions[{number}]", "phrase")
        if isinstance(phrase, str) and " ".join(phrase.split()):
            phrases.setdefault(" ".join(phrase.split()), None)
    return separator.join(list(phrases)[:max_phrases])


def _image_urls(image_data: str) -> dict[int, str]:
    """image_data.json: image id -> its URL (entries without one are left out)."""
    urls: dict[int, str] = {}
    for index, item in streamed_entries(image_data, "Visual Genome image data"):
        image_id = integer_id(required(item, image_data, f"[{index}]", "image_id", "id"))
        url = item.get("url")
        if image_id is not None and isinstance(url, str) and url.strip():
            urls.setdefault(image_id, url.strip())
    return urls


def read_visual_genome(regions: str, images: str, image_data: Optional[str], source_dir: Path,
                       separator: str, max_phrases: Optional[int] = None) -> pl.DataFrame:
    """region_descriptions.json -> one row per image (url, caption_raw, image_id, reason,
    detail), in file order; local images stored under `source_dir`."""
    described = streamed_entries(regions, "Visual Genome region descriptions")
    from_urls = images == IMAGES_FROM_URLS
    urls = _image_urls(image_data) if from_urls and image_data else {}
    files = {} if from_urls else index_folder(Path(images))
    store = images_dir(source_dir)
    name = Path(regions).name
    rows = RowsBuilder()
    for index, item in described:
        where = f"[{index}]"
        raw_id = required(item, regions, where, "id", "image_id")
        listed = required(item, regions, where, "regions")
        image_id = integer_id(raw_id)
        if not isinstance(listed, list):
            raise SourceError(f"{regions}: {where}.regions is not a list")
        caption = joined_phrases(listed, regions, where, separator, max_phrases)
        if image_id is None:
            rows.add(None, caption, None, f"{name}: {where}: id {str(raw_id)[:40]!r} is not an integer")
        elif not caption:
            rows.add(None, None, image_id, f"{name}: {where} (image {image_id}): no region phrase")
        elif from_urls:
            url = urls.get(image_id)
            problem = None if url else f"{name}: {where}: image {image_id} has no url in {Path(image_data).name}"
            rows.add(url, caption, image_id, problem)
        elif str(image_id) in files:
            rows.add(file_url(store_file(store, str(image_id), files[str(image_id)])), caption, image_id)
        else:
            rows.add(None, caption, image_id, f"{name}: {where}: no file {image_id}.jpg in {images}")
    return rows.frame()
