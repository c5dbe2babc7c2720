"""Integrity of a published corpus: every file the shard stage publishes, with its size and
SHA-256, in `<manifest_dir>/checksums.json`.

`cnclip corpus verify` checks those records, the tar members against their samples/ part, and the
accounting (samples + rejected = input rows, each row once) from what is there; a rerun of `build`
checks them before it calls a finished build up to date, and redoes the shard stage for what is
missing or changed. The manifests and shards may be local folders or fsspec URLs (a corpus
published to s3://): a local folder is a Path here, a URL stays a string (Path would fold its
`//`), and every read goes through runtime/storage.py, one listing per URL folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import tarfile
from pathlib import Path
from typing import Callable

from cnclip._common.atomic import write_json_atomic
from cnclip._common.errors import CnclipError
from cnclip._common.records import read_record
from cnclip.corpus.runtime import storage
from cnclip.corpus.runtime.engine import Engine, default_engine

Location = Path | str  # a local folder or file (Path), or an fsspec URL (str)
CHECKSUMS = "checksums.json"
_SHARDS = "shards/"  # recorded names under this prefix live in shards_dir, the rest in manifest_dir
_CHUNK = 1 << 20


def as_location(folder: str | Path) -> Location:
    """A folder or file as the manifest readers handle it: a local one a Path, a URL a string
    without a trailing `/`."""
    return str(folder).rstrip("/") if storage.is_url(folder) else Path(folder)


def location_in(folder: Location, *names: str) -> Location:
    """`folder/names...`, of the same kind as `folder`."""
    return storage.join(folder, *names) if isinstance(folder, str) else folder.joinpath(*names)


class _HashingReader:
    """A read-only stream that hashes and counts what passes through it, so one read of a tar
    both checks its SHA-256 and lists its members."""

    def __init__(self, stream):
        self.stream, self.digest, self.size = stream, hashlib.sha256(), 0

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        self.digest.update(data)
        self.size += len(data)
        return data

    def drain(self) -> tuple[int, str]:
        while self.read(_CHUNK):
            pass
        return self.size, self.digest.hexdigest()


def file_digest(path: Location) -> tuple[int, str]:
    """(size, SHA-256 hex) of a file (local or a URL), read in 1 MiB chunks."""
    with storage.open_file(path) as stream:
        return _HashingReader(stream).drain()


def tar_digest(path: Location) -> tuple[int, str, list[str] | None]:
    """(size, SHA-256 hex, member names) of a tar from one streaming read; the names are None
    when the bytes are not a readable tar."""
    with storage.open_file(path) as stream:
        reader = _HashingReader(stream)
        try:
            with tarfile.open(fileobj=reader, mode="r|") as tar:
                names = [member.name for member in tar if member.isfile()]
        except (tarfile.TarError, EOFError):
            names = None
        size, sha = reader.drain()
    return size, sha, names


def record_name(path: Location, manifest_dir: Location, shards_dir: Location) -> str:
    if isinstance(path, str):
        folder, _, name = path.rpartition("/")
        if folder == str(shards_dir).rstrip("/"):
            return _SHARDS + name
        return path.removeprefix(str(manifest_dir).rstrip("/") + "/")
    if path.parent == shards_dir:
        return _SHARDS + path.name
    return path.relative_to(manifest_dir).as_posix()


def write_checksums(manifest_dir: Path, shards_dir: Path, published: list[Path], processes: int | None = None,
                    engine: Engine | None = None) -> None:
    """Record every published file (written last: the record describes finished files)."""
    engine = engine or default_engine()
    digests = engine.map_parts(file_digest, published, "shard: checksums", processes)
    files = {
        record_name(path, manifest_dir, shards_dir): {"size": size, "sha256": sha}
        for path, (size, sha) in zip(published, digests, strict=True)
    }
    from cnclip.corpus.runtime import storage

    if storage.is_url(manifest_dir):  # as a publish records it (publish.py), written last
        from cnclip.corpus.runtime.publish import _shards_relation

        record = {"shards_dir": _shards_relation(str(shards_dir), str(manifest_dir)), "files": files}
        storage.write_text(storage.join(manifest_dir, CHECKSUMS), json.dumps(record, ensure_ascii=False, indent=2))
        return
    # Relative to manifest_dir, so a corpus copied or moved as a whole still verifies.
    where = os.path.relpath(shards_dir.resolve(), manifest_dir.resolve())
    write_json_atomic(manifest_dir / CHECKSUMS, {"shards_dir": where, "files": files})


class ChecksumsError(CnclipError, ValueError):
    """checksums.json is missing or unreadable: the corpus cannot be verified."""


def read_checksums(manifest_dir: Location) -> dict:
    """The record, or a one-line problem (ChecksumsError) when it is missing or unreadable."""
    return read_record(location_in(as_location(manifest_dir), CHECKSUMS), storage.read_text, ChecksumsError,
                       "missing (not a finished build)", "files", dict, "a checksums record")


def recorded_shards_dir(manifest_dir: Location, record: dict) -> Location:
    """Where the record says the shards are: relative to the manifests (a corpus moved or copied
    as a whole), a URL, or, for manifests on a store beside shards on this machine, a local path."""
    manifest_dir, relation = as_location(manifest_dir), str(record.get("shards_dir", ""))
    if isinstance(manifest_dir, Path):
        return Path(os.path.normpath(manifest_dir / relation))
    if storage.is_url(relation):
        return relation.rstrip("/")
    if relation.startswith("/"):
        return Path(relation)
    scheme, _, path = manifest_dir.partition("://")
    return f"{scheme}://{posixpath.normpath(posixpath.join(path, relation))}"


def _location(name: str, manifest_dir: Location, shards_dir: Location) -> Location:
    if name.startswith(_SHARDS):
        return location_in(shards_dir, name.removeprefix(_SHARDS))
    return location_in(manifest_dir, name)


_UNCOMMITTED = -1


def _sizes(paths: list[Location]) -> dict[Location, int | None]:
    """Each file's size, None when it is not there, _UNCOMMITTED for a URL part without its
    marker (an upload that never finished); one listing per URL folder, not a request per file."""
    from cnclip.corpus.runtime.commit import marker_of

    sizes: dict[Location, int | None] = {}
    listed: dict[str, dict[str, int]] = {}
    for path in paths:
        if isinstance(path, Path):
            sizes[path] = path.stat().st_size if path.is_file() else None
            continue
        folder = path.rpartition("/")[0]
        if folder not in listed:
            listed[folder] = {name: info.get("size") for name, info in storage.list_infos(folder)}
        size = listed[folder].get(path)
        sizes[path] = _UNCOMMITTED if size is not None and marker_of(path) not in listed[folder] else size
    return sizes


def damaged_files(manifest_dir: Location, shards_dir: Location | None = None, full: bool = True,
                  record: dict | None = None) -> tuple[list[str], list[Location]]:
    """One line per recorded file that is missing, of another size or (full) other bytes, and
    the paths of those files (to redo); raises ChecksumsError when there is no usable record.
    `record`: checksums.json already read by the caller."""
    return _damaged(manifest_dir, shards_dir, full, record, lambda path: file_digest(path)[1])


def _damaged(manifest_dir: Location, shards_dir: Location | None, full: bool, record: dict | None,
             sha256: Callable[[Location], str]) -> tuple[list[str], list[Location]]:
    record = record if record is not None else read_checksums(manifest_dir)
    manifest_dir = as_location(manifest_dir)
    shards_dir = as_location(shards_dir) if shards_dir else recorded_shards_dir(manifest_dir, record)
    entries = sorted(record["files"].items())
    locations = [_location(name, manifest_dir, shards_dir) for name, _ in entries]
    sizes = _sizes(locations)
    problems, paths = [], []
    for (_, expected), path in zip(entries, locations, strict=True):
        size = sizes[path]
        if size is None:
            problems.append(f"{path}: missing")
        elif size == _UNCOMMITTED:
            problems.append(f"{path}: not committed (no marker: its upload did not finish)")
        elif size != expected.get("size"):
            change = "truncated" if size < expected.get("size", 0) else "grown"
            problems.append(f"{path}: {size} bytes, {CHECKSUMS} records {expected.get('size')} ({change})")
        elif full and sha256(path) != expected.get("sha256"):
            problems.append(f"{path}: SHA-256 differs from {CHECKSUMS} (changed)")
        else:
            continue
        paths.append(path)
    return problems, paths


def _parts_in(folder: Location, suffix: str) -> list[Location]:
    if isinstance(folder, Path):
        return sorted(folder.glob(f"*{suffix}"))
    return storage.visible_parts(folder, suffix)


def unexpected_files(manifest_dir: Location, shards_dir: Location, recorded: dict) -> list[str]:
    """Published-looking files (tars, manifest parts) that the build did not record: readers of
    `samples/*.parquet` or `shards/*.tar` would take them for part of the corpus."""
    manifest_dir, shards_dir = as_location(manifest_dir), as_location(shards_dir)
    found = [*_parts_in(shards_dir, ".tar"), *_parts_in(location_in(manifest_dir, "samples"), ".parquet"),
             *_parts_in(location_in(manifest_dir, "rejected"), ".parquet")]
    if any(isinstance(path, str) for path in found):  # a URL beside local paths: one order for both
        found.sort(key=str)
    else:
        found.sort()
    return [f"{path}: not in {CHECKSUMS} (not written by this build)" for path in found
            if record_name(path, manifest_dir, shards_dir) not in recorded]


def verify_corpus(manifest_dir: str | Path, shards_dir: str | Path | None = None) -> list[str]:
    """Every problem of a built corpus, one line each (empty: intact and accounted for)."""
    from cnclip.corpus.manifests.funnel import accounting_problem
    from cnclip.corpus.manifests.members import member_problems

    manifest_dir = as_location(manifest_dir)
    members: dict[Location, list[str] | None] = {}

    def sha256(path: Location) -> str:
        if not str(path).endswith(".tar"):
            return file_digest(path)[1]
        _, sha, members[path] = tar_digest(path)
        return sha

    try:
        storage.require_folder(manifest_dir)
        record = read_checksums(manifest_dir)
        shards = as_location(shards_dir) if shards_dir else recorded_shards_dir(manifest_dir, record)
        storage.require_folder(shards)
        problems, damaged = _damaged(manifest_dir, shards, True, record, sha256)
    except CnclipError as err:
        return [str(err)]
    problems += unexpected_files(manifest_dir, shards, record["files"])
    problems += member_problems(manifest_dir, members, set(damaged))
    problem = accounting_problem(manifest_dir)
    return problems + ([problem] if problem else [])


def intact_summary(manifest_dir: str | Path) -> str:
    """The line `verify` prints for an intact corpus."""
    manifest_dir = as_location(manifest_dir)
    files = len(read_checksums(manifest_dir)["files"])
    funnel = json.loads(storage.read_text(location_in(manifest_dir, "funnel.json")))
    return (f"{manifest_dir}: intact: {files} files match {CHECKSUMS}; {funnel['samples']} samples + "
            f"{funnel['rejected']} rejected = {funnel['input_rows']} input rows")
