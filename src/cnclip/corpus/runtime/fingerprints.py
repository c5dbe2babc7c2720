"""What a stage's fingerprint records of the files it reads: each file with its size and version.

The version is what the file's filesystem says changes when the file does: the exact mtime for a
local file, the ETag (or, where there is none, the modification time or generation) for an object
store's. A listing is taken per input, so a glob or a remote prefix fingerprints every part it
matches: a rewritten, added or removed part changes the listing, and the stages that read it are
redone on the next run.
"""

from __future__ import annotations

from typing import Any

from cnclip.corpus.runtime import storage

# Checked in order: the first key a filesystem's info has is the file's version. An ETag follows
# content on S3 (a rewrite with the same bytes is no change); the times cover filesystems without.
_VERSION_KEYS = ("mtime_ns", "ETag", "etag", "md5Hash", "generation", "LastModified", "last_modified",
                 "mtime", "updated", "last_mod", "modify")


def file_version(info: dict) -> Any:
    """The version a filesystem's info gives a file (None when it gives none of the known ones)."""
    for key in _VERSION_KEYS:
        if info.get(key) is not None:
            value = info[key]
            return value if isinstance(value, (int, str)) else str(value)
    return None


def input_listing(paths: list[str]) -> list[list]:
    """[name, size, version] for every file the inputs name (a path, a glob, an fsspec URL or URL
    glob), in input order and each glob's matches sorted; an input that names nothing is kept as
    [input, None, None], so a file that appears later changes the listing too."""
    listing: list[list] = []
    listed = _remote_folders(paths)
    for path in paths:
        found = [(path, listed[path])] if path in listed else storage.list_infos(path)
        if not found:
            listing.append([path, None, None])
        for name, info in found:
            listing.append([_shown_as(path, name), info.get("size"), file_version(info)])
    return listing


def _remote_folders(paths: list[str]) -> dict[str, dict]:
    """The info of every remote file among `paths` from one listing of each folder they are in:
    a source of 10,000 parts costs a few listing pages, not 10,000 HEAD requests. Paths not
    found this way (globs, folders, missing files) are listed on their own."""
    import glob

    remote = [p for p in paths if storage.is_url(p) and not glob.has_magic(p)]
    infos: dict[str, dict] = {}
    for folder in sorted({p.rpartition("/")[0] for p in remote}):
        infos.update(storage.list_infos(folder))
    return {p: infos[p] for p in remote if p in infos}


def eval_listing(paths: list[str]) -> list[list]:
    """[set, listing] per evaluation set, the listing naming every file it reads (a folder's
    files recursively, a glob's matches): a folder's own stat or info misses an image rewritten
    inside it, and an object store has no folders to stat at all."""
    listing: list[list] = []
    for path in paths:
        infos = storage.list_infos(path, recursive=True)
        files = [[name, info.get("size"), file_version(info)] for name, info in infos]
        listing.append([path, files or [[path, None, None]]])
    return listing


def _shown_as(given: str, found: str) -> str:
    """A plain local path is recorded as the recipe wrote it (file:// prefix and all): the same
    recipe then gives the same listing wherever its relative paths are resolved."""
    if not storage.is_url(given) and storage.local_path(given) == found:
        return given
    return found
