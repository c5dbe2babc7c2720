"""Chinese-CLIP's finetuning layout (what it distributes MUGE, Flickr30K-CN and COCO-CN in):

    {split}_imgs.tsv     "{image_id}\\t{base64 of the image file}", one image a line
    {split}_texts.jsonl  {"text_id": int, "text": str, "image_ids": [int, ...]}, one text a line

One row per (text, image) pair, in text order then image order, keeping `image_id` and
`text_id`. The TSV is streamed: each image is decoded once and stored under the build's folder
(stored.py). Chinese-CLIP writes standard base64 and reads it with urlsafe_b64decode, so both
alphabets are read. A bad line never fails the set: a text line that is not JSON, lacks a key
or has no image_ids is one rejected row (ingest:bad_row, its line number); a pair whose image's
TSV line has bad base64 is rejected naming that line; a pair naming an image id the TSV does
not have is rejected too.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from cnclip.corpus.sources.rows import CAPTION_NOT_TEXT, iter_raw_lines
from cnclip.corpus.sources.stored import RowsBuilder, file_url, images_dir, integer_id, store_bytes

_URLSAFE = bytes.maketrans(b"-_", b"+/")


def split_files(folder: str, split: str) -> tuple[Path, Path]:
    """The split's image TSV and text JSONL."""
    return Path(folder) / f"{split}_imgs.tsv", Path(folder) / f"{split}_texts.jsonl"


def decode_image(payload: bytes) -> bytes | None:
    """The image bytes of a TSV line's base64 field (either alphabet), or None if not base64."""
    text = payload.strip().translate(_URLSAFE)
    try:
        data = base64.b64decode(text + b"=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        return None
    return data or None


@dataclass
class TsvImages:
    """What the TSV holds: stored images by id (their file), the ids whose line was bad, and
    the lines no id could be read from."""

    path: Path
    stored: dict[int, Path] = field(default_factory=dict)
    bad: dict[int, int] = field(default_factory=dict)  # image id -> its line
    unreadable: list[int] = field(default_factory=list)

    def problem(self, image_id: int) -> str | None:
        """Why a text's image id has no image (None when it has one)."""
        if image_id in self.stored:
            return None
        if image_id in self.bad:
            return f"{self.path.name} line {self.bad[image_id]}: image {image_id} is not valid base64"
        unreadable = (f" ({len(self.unreadable)} unreadable line(s) there, the first line {self.unreadable[0]})"
                      if self.unreadable else "")
        return f"image id {image_id} is not in {self.path.name}{unreadable}"


def read_images_tsv(path: Path, store: Path) -> TsvImages:
    """Stream the TSV, storing each image (the first line of a repeated id wins)."""
    images = TsvImages(path)
    for number, raw in iter_raw_lines(str(path)):
        if not raw.strip():
            continue
        head, tab, payload = raw.partition(b"\t")
        image_id = integer_id(head.decode("ascii", "replace"))
        if not tab or image_id is None:
            images.unreadable.append(number)
            continue
        if image_id in images.stored or image_id in images.bad:
            continue
        data = decode_image(payload)
        if data is None:
            images.bad[image_id] = number
        else:
            images.stored[image_id] = store_bytes(store, str(image_id), data)
    return images


def _text_problem(value: object) -> str | None:
    if not isinstance(value, dict):
        return "not a JSON object"
    for key in ("text_id", "text", "image_ids"):
        if key not in value:
            return f"no key {key!r}" + (" (a query without its images)" if key == "image_ids" else "")
    if not isinstance(value["image_ids"], list) or not value["image_ids"]:
        return "image_ids is not a non-empty list (a query without its images)"
    return None


def read_cn_clip(folder: str, split: str, source_dir: Path) -> pl.DataFrame:
    """A split -> rows (url, caption_raw, image_id, text_id, reason, detail); images stored under
    `source_dir`."""
    tsv, jsonl = split_files(folder, split)
    images = read_images_tsv(tsv, images_dir(source_dir))
    rows = RowsBuilder("text_id")
    for number, raw in iter_raw_lines(str(jsonl)):
        if not raw.strip():
            continue
        where = f"{jsonl.name} line {number}"
        try:
            value = json.loads(raw.decode("utf-8-sig" if number == 1 else "utf-8"))
        except (ValueError, RecursionError) as err:  # UnicodeDecodeError is a ValueError
            rows.add(None, None, None, f"{where}: not valid JSON ({str(err).splitlines()[0][:80]})")
            continue
        problem = _text_problem(value)
        if problem is not None:
            text_id = value.get("text_id") if isinstance(value, dict) else None
            rows.add(None, None, None, f"{where}: {problem}", text_id=integer_id(text_id))
            continue
        text, text_id = value["text"], integer_id(value["text_id"])
        for raw_id in value["image_ids"]:
            image_id = integer_id(raw_id)
            if image_id is None:
                rows.add(None, text, None, f"{where}: image id {str(raw_id)[:40]!r} is not an integer", text_id=text_id)
            elif not isinstance(text, str):
                rows.add(None, None, image_id, f"{where}: text is not a string", reason=CAPTION_NOT_TEXT,
                         text_id=text_id)
            else:
                problem = images.problem(image_id)
                url = None if problem else file_url(images.stored[image_id])
                rows.add(url, text, image_id, None if problem is None else f"{where}: {problem}", text_id=text_id)
    return rows.frame()
