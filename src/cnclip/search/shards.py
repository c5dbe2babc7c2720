"""A built corpus's shards, read one member at a time by (shard, key).

The tar members are indexed once per shard (name -> offset and size, from the tar headers alone),
so serving a thumbnail is one seek and one read, never a scan of a tar.
"""

from __future__ import annotations

import json
import tarfile
import threading
from pathlib import Path

from cnclip.search.index import SearchError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


def shards_dir(manifest_dir: Path) -> Path:
    """The shards folder the build's funnel.json names (relative names are to the manifests)."""
    funnel = Path(manifest_dir) / "funnel.json"
    try:
        named = json.loads(funnel.read_text(encoding="utf-8"))["shards_dir"]
    except (OSError, ValueError, KeyError):
        raise SearchError(f"{funnel}: missing or names no shards folder (not a finished build)") from None
    if "://" in named:
        raise SearchError(f"{funnel}: the shards are at {named}; reading images needs a local shards folder")
    return (Path(manifest_dir) / named).resolve()


class ShardMembers:
    """(shard, key) -> the bytes of that sample's image (or another member), one read each."""

    def __init__(self, manifest_dir: Path):
        self.folder = shards_dir(manifest_dir)
        self._members: dict[int, dict[str, tuple[int, int]]] = {}
        self._lock = threading.Lock()

    def tar(self, shard: int) -> Path:
        return self.folder / f"{shard:05d}.tar"

    def members(self, shard: int) -> dict[str, tuple[int, int]]:
        """Member name -> (data offset, size) of one shard, read from its headers the first time."""
        with self._lock:
            if shard not in self._members:
                path = self.tar(shard)
                try:
                    with tarfile.open(path) as tar:
                        self._members[shard] = {m.name: (m.offset_data, m.size) for m in tar if m.isfile()}
                except (OSError, tarfile.TarError) as err:
                    raise SearchError(f"{path}: cannot read the shard ({err})") from None
            return self._members[shard]

    def read(self, shard: int, name: str) -> bytes:
        members = self.members(shard)
        if name not in members:
            raise KeyError(name)
        offset, size = members[name]
        with open(self.tar(shard), "rb") as handle:
            handle.seek(offset)
            return handle.read(size)

    def image_name(self, shard: int, key: str) -> str:
        """The image member of `key` (its suffix is the build's encode format)."""
        members = self.members(shard)
        for suffix in IMAGE_SUFFIXES:
            if key + suffix in members:
                return key + suffix
        raise KeyError(key)

    def image(self, shard: int, key: str) -> tuple[str, bytes]:
        """(member name, bytes) of `key`'s image in `shard`."""
        name = self.image_name(shard, key)
        return name, self.read(shard, name)
