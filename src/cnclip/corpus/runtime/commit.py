"""Committing a part so that a part a reader (or a resumed stage) finds is always whole.

On a local disk a part is written under a temporary name and renamed into place (the one atomic
writer, _common/atomic.py): rename is atomic, so a part that exists is whole. An object store
has no rename (s3fs copies, then deletes), and some filesystems show a file while it is being
written, so there a part is written under its own name and then committed by a marker object
beside it, `.NAME.committed`, written after the part is whole. Readers trust only parts whose
marker is there; a writer removes a part's marker before it rewrites the part, and a remover
removes the marker first, so at no moment does a marker vouch for bytes it was not written for.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator

from cnclip._common.atomic import atomic_path, remove_temporaries
from cnclip.corpus.runtime import storage
from cnclip.corpus.runtime.fingerprints import file_version

MARKER_SUFFIX = ".committed"


def renames_atomically(path: str | Path) -> bool:
    """Whether a part at `path` commits by rename (a local disk) rather than by a marker."""
    return not storage.is_url(path)


def marker_of(path: str | Path) -> str:
    """The marker that commits the part at `path` (a hidden object beside it)."""
    folder, _, name = str(path).rpartition("/")
    return f"{folder}/.{name}{MARKER_SUFFIX}"


def _part_of(marker: str) -> str:
    folder, _, name = marker.rpartition("/")
    return f"{folder}/{name[1:].removesuffix(MARKER_SUFFIX)}"


def is_committed(path: str | Path) -> bool:
    """Whether the part at `path` is whole: it exists (local: a file, or the folder of parts a
    Spark write renames into place whole), or its marker does (elsewhere)."""
    if renames_atomically(path):
        local = Path(storage.local_path(path))
        return local.is_file() or local.is_dir()
    return storage.exists(marker_of(path)) and storage.exists(path)


def _mark(path: str, note: dict) -> None:
    storage.write_bytes(marker_of(path), json.dumps(note, sort_keys=True).encode())


def read_marker(path: str | Path) -> dict | None:
    """What the marker of the part at `path` records (its size, and what the committer added),
    or None when the part is not committed by a marker."""
    try:
        return json.loads(storage.read_bytes(marker_of(path)))
    except (FileNotFoundError, ValueError):
        return None


def upload(local: Path, path: str, note: dict | None = None) -> None:
    """Commit a whole local file as the part at URL `path`, its marker recording `note` too."""
    storage.remove(marker_of(path))  # the old marker must not vouch for the bytes about to come
    fs, stripped = storage.filesystem(path)
    fs.put_file(str(local), stripped)
    # The version the store gave these bytes: a later rewrite by anyone else changes it.
    version = file_version(fs.info(stripped))
    _mark(path, {**(note or {}), "size": local.stat().st_size, "version": version})


@contextmanager
def committed_path(path: str | Path) -> Iterator[Path]:
    """Yield a local file to write the part's content to (for writers that want a path: polars,
    tarfile); when the block ends without an exception the part is committed at `path`, on an
    exception nothing is (a previous committed part stays as it was locally; remotely its marker
    is already gone, so it is redone)."""
    if renames_atomically(path):
        with atomic_path(storage.local_path(path)) as tmp:
            yield tmp
        return
    path = str(path)
    storage.remove(marker_of(path))  # uncommitted from the start: a crash below leaves no vouching marker
    staging = Path(tempfile.mkdtemp(prefix="cnclip-part-"))
    try:
        local = staging / Path(path).name
        yield local
        upload(local, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@contextmanager
def part_writer(path: str | Path) -> Iterator[IO[bytes]]:
    """Yield a binary handle to stream the part's bytes into; committed as committed_path is."""
    with committed_path(path) as tmp, open(tmp, "wb") as handle:
        yield handle


def write_part(path: str | Path, data: bytes) -> None:
    """A whole part's bytes, committed."""
    with part_writer(path) as handle:
        handle.write(data)


def write_parquet_part(frame, path: str | Path) -> None:
    """A frame (polars, eager or lazy) as a committed Parquet part: locally through state.py's
    write_parquet_atomic, elsewhere staged locally and committed by marker."""
    from cnclip.corpus.runtime.state import write_parquet_atomic

    if renames_atomically(path):
        write_parquet_atomic(frame, Path(storage.local_path(path)))
        return
    with committed_path(path) as staged:
        write_parquet_atomic(frame, staged)


def remove_part(path: str | Path) -> None:
    """Uncommit, then remove: a reader never sees a marker whose part is half gone."""
    if not renames_atomically(path):
        storage.remove(marker_of(path))
    storage.remove(path)


def committed_parts(folder: str | Path, suffix: str = "") -> list[str]:
    """The whole parts in `folder` whose names end in `suffix`, sorted, from one listing; a part
    without its marker (a writer that crashed, or one still writing) is not among them."""
    if renames_atomically(folder):
        local = Path(storage.local_path(folder))
        if not local.is_dir():
            return []
        return sorted(str(p) for p in local.iterdir()
                      if p.is_file() and p.name.endswith(suffix) and not p.name.startswith("."))
    names = set(storage.list_files(folder))
    return sorted(name for name in names if not name.rpartition("/")[2].startswith(".")
                  and name.endswith(suffix) and marker_of(name) in names)


def discard_uncommitted(folder: str | Path) -> None:
    """Before a stage resumes in `folder` (a folder the build owns: every file in it is a part):
    remove what crashed writers left (temporary files locally; elsewhere parts without a marker
    and markers without a part), so a resume rewrites exactly the parts that are not whole."""
    if renames_atomically(folder):
        remove_temporaries(Path(storage.local_path(folder)))
        return
    names = set(storage.list_files(folder))
    for name in sorted(names):
        base = name.rpartition("/")[2]
        if base.startswith(".") and base.endswith(MARKER_SUFFIX):
            if _part_of(name) not in names:
                storage.remove(name)
        elif marker_of(name) not in names:
            storage.remove(name)
