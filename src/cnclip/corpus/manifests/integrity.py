"""Integrity of a published corpus: every file the shard stage publishes, with its size and
SHA-256, in `<manifest_dir>/checksums.json`.

`cnclip corpus verify` checks those records and the accounting (samples + rejected = input rows,
each row once) from what is on disk; a rerun of `build` checks them before it calls a finished
build up to date, and redoes the shard stage for what is missing or changed.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from cnclip._common.atomic import write_json_atomic
from cnclip._common.errors import CnclipError
from cnclip.corpus.runtime.engine import Engine, default_engine

CHECKSUMS = "checksums.json"
_SHARDS = "shards/"  # recorded names under this prefix live in shards_dir, the rest in manifest_dir
_CHUNK = 1 << 20


def file_digest(path: Path | str) -> tuple[int, str]:
    """(size, SHA-256 hex) of a file (or an fsspec URL's object), read in 1 MiB chunks."""
    from cnclip.corpus.runtime.storage import open_file

    digest, size = hashlib.sha256(), 0
    with open_file(path) as stream:
        while chunk := stream.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def record_name(path: Path | str, manifest_dir: Path | str, shards_dir: Path | str) -> str:
    if isinstance(path, str):  # a URL of a build written in place: names relative to its folders
        folder, _, name = path.rpartition("/")
        return _SHARDS + name if folder == str(shards_dir) else path.removeprefix(f"{manifest_dir}/")
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


def read_checksums(manifest_dir: Path) -> dict:
    """The record, or a one-line problem (ChecksumsError) when it is missing or unreadable."""
    path = manifest_dir / CHECKSUMS
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ChecksumsError(f"{path}: missing (not a finished build)") from None
    except (OSError, ValueError) as err:
        raise ChecksumsError(f"{path}: unreadable ({err})") from None
    if not isinstance(record, dict) or not isinstance(record.get("files"), dict):
        raise ChecksumsError(f"{path}: not a checksums record (no 'files' mapping)")
    return record


def recorded_shards_dir(manifest_dir: Path, record: dict) -> Path:
    return Path(os.path.normpath(manifest_dir / record.get("shards_dir", "")))


def _location(name: str, manifest_dir: Path, shards_dir: Path) -> Path:
    return shards_dir / name.removeprefix(_SHARDS) if name.startswith(_SHARDS) else manifest_dir / name


def damaged_files(manifest_dir: Path, shards_dir: Path | None = None, full: bool = True,
                  record: dict | None = None) -> tuple[list[str], list[Path]]:
    """One line per recorded file that is missing, of another size or (full) other bytes, and
    the paths of those files (to redo); raises ChecksumsError when there is no usable record.
    `record`: checksums.json already read by the caller."""
    record = record if record is not None else read_checksums(manifest_dir)
    shards_dir = Path(shards_dir) if shards_dir else recorded_shards_dir(manifest_dir, record)
    problems, paths = [], []
    for name, expected in sorted(record["files"].items()):
        path = _location(name, manifest_dir, shards_dir)
        if not path.is_file():
            problems.append(f"{path}: missing")
        else:
            size = path.stat().st_size
            if size != expected.get("size"):
                change = "truncated" if size < expected.get("size", 0) else "grown"
                problems.append(f"{path}: {size} bytes, {CHECKSUMS} records {expected.get('size')} ({change})")
            elif full and file_digest(path)[1] != expected.get("sha256"):
                problems.append(f"{path}: SHA-256 differs from {CHECKSUMS} (changed)")
            else:
                continue
        paths.append(path)
    return problems, paths


def unexpected_files(manifest_dir: Path, shards_dir: Path, recorded: dict) -> list[str]:
    """Published-looking files (tars, manifest parts) that the build did not record: readers of
    `samples/*.parquet` or `shards/*.tar` would take them for part of the corpus."""
    found = [*shards_dir.glob("*.tar"), *(manifest_dir / "samples").glob("*.parquet"),
             *(manifest_dir / "rejected").glob("*.parquet")]
    return [f"{path}: not in {CHECKSUMS} (not written by this build)" for path in sorted(found)
            if record_name(path, manifest_dir, shards_dir) not in recorded]


def verify_corpus(manifest_dir: str | Path, shards_dir: str | Path | None = None) -> list[str]:
    """Every problem of a built corpus, one line each (empty: intact and accounted for)."""
    from cnclip.corpus.manifests.funnel import accounting_problem

    manifest_dir = Path(manifest_dir)
    try:
        record = read_checksums(manifest_dir)
        problems, _ = damaged_files(manifest_dir, shards_dir, record=record)
    except ValueError as err:
        return [str(err)]
    shards = Path(shards_dir) if shards_dir else recorded_shards_dir(manifest_dir, record)
    problems += unexpected_files(manifest_dir, shards, record["files"])
    problem = accounting_problem(manifest_dir)
    return problems + ([problem] if problem else [])


def intact_summary(manifest_dir: str | Path) -> str:
    """The line `verify` prints for an intact corpus."""
    manifest_dir = Path(manifest_dir)
    files = len(read_checksums(manifest_dir)["files"])
    funnel = json.loads((manifest_dir / "funnel.json").read_text(encoding="utf-8"))
    return (f"{manifest_dir}: intact: {files} files match {CHECKSUMS}; {funnel['samples']} samples + "
            f"{funnel['rejected']} rejected = {funnel['input_rows']} input rows")
