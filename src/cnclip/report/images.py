"""Images for the corpus report, read one tar member at a time: sample thumbnails from the
shards, and a duplicate's own image from the download's tars (under work/, while it exists).

Only the few members a report shows are read; a tar is walked by its headers (tarfile seeks past
the other members' data), so a report over a large corpus reads kilobytes, not the shards.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path
from typing import Iterable

from PIL import Image

from cnclip.report.page import data_uri, esc

IMAGE_SUFFIXES = {"jpg": "image/jpeg", "jpeg": "image/jpeg", "png": "image/png", "webp": "image/webp"}
_INLINE_LIMIT = 48 * 1024  # a stored image this small goes in as it is: the page shows its own pixels


def read_images(tar_path: Path, keys: Iterable[str]) -> dict[str, tuple[str, bytes]]:
    """key -> (mime, bytes) of each image member `{key}.{jpg,png,webp}` of `tar_path` found; a
    missing or unreadable tar gives what was read before the damage (possibly nothing)."""
    wanted, found = set(keys), {}
    if not wanted or not Path(tar_path).is_file():
        return found
    try:
        with tarfile.open(tar_path, "r:") as tar:
            for member in tar:
                key, _, suffix = member.name.rpartition(".")
                if key in wanted and suffix.lower() in IMAGE_SUFFIXES and member.isfile():
                    found[key] = (IMAGE_SUFFIXES[suffix.lower()], tar.extractfile(member).read())
                    if len(found) == len(wanted):
                        break
    except (OSError, tarfile.TarError):
        pass
    return found


def thumbnail_uri(mime: str, data: bytes, size: int = 192) -> str | None:
    """A data: URI for the image: its own bytes when small, else a JPEG thumbnail; None when the
    bytes are not an image PIL can read."""
    if len(data) <= _INLINE_LIMIT:
        return data_uri(data, mime)
    try:
        with Image.open(io.BytesIO(data)) as image:
            image = image.convert("RGB")
            image.thumbnail((size, size))
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=85)
    except (OSError, ValueError, Image.DecompressionBombError):
        return None
    return data_uri(buffer.getvalue(), "image/jpeg")


def image_tag(found: tuple[str, bytes] | None, alt: str, missing: str, **attrs: str) -> str:
    """An <img> of the found member, or a grey box saying why there is none."""
    uri = thumbnail_uri(*found) if found else None
    if uri is None:
        return f'<div class="gone">{esc(missing)}</div>'
    extra = "".join(f' {name.replace("_", "-")}="{esc(value)}"' for name, value in attrs.items())
    return f'<img src="{uri}" alt="{esc(alt)}" loading="eager"{extra}>'


def shard_path(shards_dir: Path, key: str) -> Path:
    """The shard holding a sample key (its first 5 digits are the shard number)."""
    return Path(shards_dir) / f"{key[:5]}.tar"


def images_by_key(shards_dir: Path, keys: Iterable[str]) -> dict[str, tuple[str, bytes]]:
    """Each sample key's image from its shard, each shard opened once."""
    by_shard: dict[Path, list[str]] = {}
    for key in keys:
        by_shard.setdefault(shard_path(shards_dir, key), []).append(key)
    found: dict[str, tuple[str, bytes]] = {}
    for path, wanted in sorted(by_shard.items()):
        found.update(read_images(path, wanted))
    return found


def download_images(download_dir: Path, members: Iterable[tuple[int, str, str]]) -> dict[int, tuple[str, bytes]]:
    """uid -> image of each (uid, tar, key) from img2dataset's tars under work/download/."""
    by_tar: dict[str, dict[str, int]] = {}
    for uid, tar, key in members:
        if tar and key:
            by_tar.setdefault(tar, {})[key.rpartition(".")[0] if "." in key else key] = uid
    found: dict[int, tuple[str, bytes]] = {}
    for tar, keys in sorted(by_tar.items()):
        for key, image in read_images(Path(download_dir) / tar, keys).items():
            found[keys[key]] = image
    return found
