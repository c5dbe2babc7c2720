"""Where a build reads and writes: a local path or an fsspec URL (s3://, gs://, hdfs://, memory://).

Every helper takes either form, so a stage does not care where its files live. Local paths are
handed to the local filesystem (and local writes to the one atomic writer, _common/atomic.py);
anything with a scheme other than file:// goes through fsspec, whose driver for the scheme (s3fs
for s3://) must be installed. Credentials and endpoints come from the driver's usual settings
(for s3fs: AWS_* environment variables, ~/.aws, FSSPEC_S3_* config), never from the recipe.
"""

from __future__ import annotations

import glob as _glob
from pathlib import Path
from typing import IO, Any, Sequence

from cnclip._common.atomic import write_text_atomic
from cnclip._common.errors import CnclipError


def is_url(path: str | Path) -> bool:
    """Whether `path` names a remote file (anything with a scheme but file://)."""
    text = str(path)
    return "://" in text and not text.startswith("file://")


def local_path(path: str | Path) -> str:
    """A local path with any file:// prefix removed."""
    return str(path).removeprefix("file://")


def filesystem(path: str | Path) -> tuple[Any, str]:
    """The fsspec filesystem of a URL and the URL's path as that filesystem names it.

    The filesystem's listing cache is dropped first: a listing kept from earlier in this process
    would hide a part rewritten since (a stale ETag fingerprints a changed input as unchanged)."""
    import fsspec

    fs, stripped = fsspec.core.url_to_fs(str(path))
    fs.invalidate_cache()
    return fs, stripped


def join(folder: str | Path, *names: str) -> str:
    """`folder/name/...` for a local folder or a URL (a URL keeps its scheme and `/`)."""
    if is_url(folder):
        return "/".join([str(folder).rstrip("/"), *names])
    return str(Path(local_path(folder), *names))


def open_file(path: str | Path, mode: str = "rb", compression: str | None = None) -> IO:
    """An open file for reading (or, remote only, writing in place: see commit.py for parts)."""
    if not is_url(path):
        return open(local_path(path), mode)  # noqa: SIM115 - the caller closes it
    import fsspec

    return fsspec.open(str(path), mode, compression=compression).open()


def read_bytes(path: str | Path) -> bytes:
    if not is_url(path):
        return Path(local_path(path)).read_bytes()
    fs, stripped = filesystem(path)
    return fs.cat_file(stripped)


def read_text(path: str | Path) -> str:
    return read_bytes(path).decode("utf-8")


def write_bytes(path: str | Path, data: bytes) -> None:
    """Write a whole small file (a record, a manifest): locally through the atomic writer; on an
    object store one PUT, which readers see whole or not at all."""
    if not is_url(path):
        from cnclip._common.atomic import atomic_path

        with atomic_path(local_path(path)) as tmp:
            tmp.write_bytes(data)
        return
    fs, stripped = filesystem(path)
    fs.pipe_file(stripped, data)


def write_text(path: str | Path, text: str) -> None:
    if not is_url(path):
        write_text_atomic(local_path(path), text)
        return
    write_bytes(path, text.encode("utf-8"))


def exists(path: str | Path) -> bool:
    if not is_url(path):
        return Path(local_path(path)).exists()
    fs, stripped = filesystem(path)
    return fs.exists(stripped)


def is_dir(path: str | Path) -> bool:
    if not is_url(path):
        return Path(local_path(path)).is_dir()
    fs, stripped = filesystem(path)
    return fs.isdir(stripped)


def remove(path: str | Path) -> None:
    """Remove a file or a folder with everything in it; a path that is not there is no error."""
    if not is_url(path):
        import shutil

        local = Path(local_path(path))
        if local.is_dir():
            shutil.rmtree(local)
        else:
            local.unlink(missing_ok=True)
        return
    fs, stripped = filesystem(path)
    if fs.exists(stripped):
        fs.rm(stripped, recursive=True)


def list_files(path: str | Path, recursive: bool = False) -> list[str]:
    """The files a folder holds (recursively if asked), or a glob's matches, sorted, named as
    given (a URL keeps its scheme); a path that is one file lists itself; nothing there: []."""
    return [name for name, _ in list_infos(path, recursive)]


def list_infos(path: str | Path, recursive: bool = False) -> list[tuple[str, dict]]:
    """list_files with each file's info (size, and mtime or ETag: whatever the filesystem says),
    from one listing call per folder or glob: an object store answers it without a HEAD per file."""
    if not is_url(path):
        return _local_infos(local_path(path), recursive)
    fs, stripped = filesystem(path)
    if _glob.has_magic(stripped):
        found = fs.glob(stripped, detail=True)
    elif fs.isdir(stripped):
        found = fs.find(stripped, detail=True) if recursive else fs.ls(stripped, detail=True)
        found = found if isinstance(found, dict) else {entry["name"]: entry for entry in found}
    else:
        try:
            found = {stripped: fs.info(stripped)}
        except FileNotFoundError:
            return []
    files = [(fs.unstrip_protocol(name), info) for name, info in found.items() if info.get("type") == "file"]
    return sorted(files)


def _local_infos(path: str, recursive: bool) -> list[tuple[str, dict]]:
    local = Path(path)
    if _glob.has_magic(path):
        names = [p for p in _glob.glob(path, recursive=True) if Path(p).is_file()]
    elif local.is_dir():
        names = [str(p) for p in (local.rglob("*") if recursive else local.iterdir()) if p.is_file()]
    else:
        names = [path] if local.is_file() else []
    return sorted((name, _local_info(name)) for name in names)


def _local_info(path: str) -> dict:
    """A local file's size and mtime in nanoseconds (fsspec's local info rounds mtime to a float
    of seconds; the exact value keeps a rewrite within the same microsecond visible)."""
    stat = Path(path).stat()
    return {"name": path, "type": "file", "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def make_dirs(path: str | Path) -> None:
    """Create a local folder (and its parents); an object store has no folders to create."""
    if not is_url(path):
        Path(local_path(path)).mkdir(parents=True, exist_ok=True)


def create_exclusive(path: str | Path, data: bytes) -> bool:
    """Write `path` only if nothing is there; False when something already is. Locally O_EXCL;
    on S3 a conditional PUT (If-None-Match: *), which the store decides atomically. A filesystem
    without conditional writes falls back to check-then-write, and the caller re-reads to see
    whose write stayed."""
    if not is_url(path):
        import os

        local = Path(local_path(path))
        local.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(local, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        return True
    fs, stripped = filesystem(path)
    try:
        fs.pipe_file(stripped, data, mode="create")
    except FileExistsError:
        return False
    except (TypeError, NotImplementedError):  # no conditional writes on this filesystem
        if fs.exists(stripped):
            return False
        fs.pipe_file(stripped, data)
    return True


def read_parquet(path: str | Path):
    """One Parquet file as a polars DataFrame (polars' own reader locally)."""
    import polars as pl

    if not is_url(path):
        return pl.read_parquet(local_path(path))
    return scan_parquet(path).collect()


# --- reading a corpus back from a URL ------------------------------------------------------------

class StorageError(CnclipError, OSError):
    """A URL that cannot be read: its driver is not installed, its bucket or folder is not there."""


def checked_filesystem(path: str | Path) -> tuple[Any, str]:
    """filesystem(), with a missing driver or an unknown scheme as one line naming the URL (and
    the package to install) instead of fsspec's ImportError."""
    from cnclip._common.urls import url_filesystem

    fs, stripped = url_filesystem(str(path), StorageError)
    fs.invalidate_cache()
    return fs, stripped


def require_folder(path: str | Path) -> None:
    """Before a URL folder is read: its filesystem loads and it holds something, or a one-line
    StorageError says which (no such bucket, nothing there). Local folders are left to the
    reader, whose messages name the missing file."""
    if not is_url(path):
        return
    from cnclip._common.urls import missing_location

    fs, stripped = checked_filesystem(path)
    try:
        there = fs.isdir(stripped)
    except PermissionError as err:
        raise StorageError(f"{path}: access denied ({err})") from None
    if not there:
        raise StorageError(missing_location(fs, str(path), stripped))


def visible_parts(folder: str | Path, suffix: str) -> list[str]:
    """The files in a URL folder ending in `suffix`, markers and other hidden objects left out:
    what a reader globbing `folder/*suffix` takes for parts (committed or not), from one listing."""
    return [name for name in list_files(folder)
            if name.endswith(suffix) and not name.rpartition("/")[2].startswith(".")]


def scan_parquet(paths: str | Path | Sequence[str | Path]):
    """One lazy polars frame over one Parquet file or several parts, local or URLs; columns missing
    from a part are null. Locally polars' own scan; a URL part through a pyarrow dataset over its
    fsspec filesystem, so the endpoint and credentials are the driver's (polars' own cloud reader
    would need them again in its own form) and only the columns a query selects are read."""
    import polars as pl

    if isinstance(paths, (str, Path)):
        paths = [paths]
    if not paths:
        raise ValueError("scan_parquet: no parts")
    if not is_url(paths[0]):
        frames = [pl.scan_parquet(local_path(path)) for path in paths]
    else:
        import pyarrow.dataset as ds

        fs, _ = checked_filesystem(paths[0])
        frames = [pl.scan_pyarrow_dataset(ds.dataset(fs._strip_protocol(str(path)), filesystem=fs,
                                                     format="parquet")) for path in paths]
    return frames[0] if len(frames) == 1 else pl.concat(frames, how="diagonal_relaxed")
