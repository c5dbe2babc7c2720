"""Publishing a build to an fsspec URL (s3://bucket/corpus): shards and manifests on an object store.

A recipe whose `output_dir` or `manifest_dir` is a URL builds as usual under its local `work_dir`
(work files, and a staged copy of the shards and manifests: the stages, the resume and the local
integrity check are the ones of a local build), and the shard stage then publishes what its
checksums.json records: every tar and Parquet part is uploaded and committed by its marker
(commit.py), the funnel is published naming the remote shards, and checksums.json is written
last, so a corpus whose checksums.json is there is whole. A rerun uploads only what changed
(each marker records the SHA-256 it was uploaded with) and verifies nothing else it need not.
A URL work_dir stages nothing: the stages write the same objects in place (layout.py), and
nothing is published afterwards.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
from pathlib import Path
from typing import TYPE_CHECKING

from cnclip._common.atomic import write_text_atomic
from cnclip._common.console import warn
from cnclip._common.errors import CnclipError
from cnclip.corpus.runtime import storage
from cnclip.corpus.runtime.commit import committed_parts, is_committed, read_marker, remove_part, upload

if TYPE_CHECKING:
    from cnclip.corpus.recipe import Recipe

CHECKSUMS = "checksums.json"  # the name integrity.py gives the record
_SHARDS = "shards/"  # recorded names under this prefix are in the shards folder (as in integrity.py)
_CHUNK = 1 << 20


class PublishError(CnclipError, RuntimeError):
    """A published corpus that cannot be read or checked; the message names the URL."""


def publishes_remotely(recipe: "Recipe") -> bool:
    return storage.is_url(recipe.output_dir) or storage.is_url(recipe.manifest_dir)


def local_roots(recipe: "Recipe") -> tuple[Path, Path]:
    """The local output and manifest folders the stages write: the recipe's own, or, for a URL,
    its staged copy under work_dir."""
    output = Path(recipe.work_dir) if storage.is_url(recipe.output_dir) else Path(recipe.output_dir)
    remote = storage.is_url(recipe.manifest_dir)
    manifests = Path(recipe.work_dir) / "manifests" if remote else Path(recipe.manifest_dir)
    return output, manifests


def targets(recipe: "Recipe") -> tuple[str, str]:
    """Where the shards and the manifests are published (a URL, or the local folder itself)."""
    from cnclip.corpus.runtime.layout import BuildLayout

    layout = BuildLayout.of(recipe)
    shards = storage.join(recipe.output_dir, "shards") if storage.is_url(recipe.output_dir) else str(layout.shards_dir)
    return shards, str(recipe.manifest_dir) if storage.is_url(recipe.manifest_dir) else str(layout.manifest_dir)


def _part_folders(shards: str, manifests: str) -> list[tuple[str, str]]:
    """Each folder of published parts, with the ending its parts have."""
    return [(shards, ".tar"), (storage.join(manifests, "samples"), ".parquet"),
            (storage.join(manifests, "rejected"), ".parquet")]


def _target(name: str, shards: str, manifests: str) -> str:
    if name.startswith(_SHARDS):
        return storage.join(shards, name.removeprefix(_SHARDS))
    return storage.join(manifests, name)


def _shards_relation(shards: str, manifests: str) -> str:
    """checksums.json's `shards_dir`: relative to the manifests where both are under one bucket
    (a corpus copied as a whole still verifies), else where the shards are."""
    scheme_s, _, path_s = shards.partition("://")
    scheme_m, _, path_m = manifests.partition("://")
    same_root = scheme_s == scheme_m and path_s.split("/", 1)[0] == path_m.split("/", 1)[0]
    return posixpath.relpath(path_s, path_m) if storage.is_url(shards) and same_root else shards


def _published_funnel(layout, shards: str) -> Path:
    """The funnel as published: naming the shards where a trainer given the manifests finds them."""
    funnel = json.loads(layout.funnel_path.read_text(encoding="utf-8"))
    funnel["shards_dir"] = shards if storage.is_url(shards) else funnel["shards_dir"]
    staged = layout.work / "publish" / "funnel.json"
    write_text_atomic(staged, json.dumps(funnel, ensure_ascii=False, indent=2))
    return staged


def _digest(path: Path) -> dict:
    data = path.read_bytes()
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def publish(recipe: "Recipe") -> dict:
    """Upload what the local build's checksums.json records that is not already published with
    the same SHA-256, then the record itself; returns counts and where the corpus now is."""
    from cnclip.corpus.manifests.integrity import read_checksums
    from cnclip.corpus.runtime.layout import BuildLayout

    layout = BuildLayout.of(recipe)
    shards, manifests = targets(recipe)
    files = dict(read_checksums(layout.manifest_dir)["files"])
    locals_ = {name: (layout.shards_dir / name.removeprefix(_SHARDS) if name.startswith(_SHARDS)
                      else layout.manifest_dir / name) for name in files}
    locals_["funnel.json"] = _published_funnel(layout, shards)
    files["funnel.json"] = _digest(locals_["funnel.json"])
    remote = {name: _target(name, shards, manifests) for name in files}
    # Parts first, the funnel after them; each only where it is not a local folder already.
    names = sorted((n for n in files if storage.is_url(remote[n])), key=lambda n: (n == "funnel.json", n))
    listed = _listed_versions({remote[n] for n in names})
    todo = [n for n in names if not _published(remote[n], files[n]["sha256"], listed)]
    checksums = storage.join(manifests, CHECKSUMS)
    if todo and storage.is_url(manifests):
        storage.remove(checksums)  # while parts change, the corpus reads as unfinished, not as a mix
    for name in todo:
        upload(locals_[name], remote[name], {"sha256": files[name]["sha256"]})
    stale = _remove_stale(shards, manifests, set(remote.values()))
    if storage.is_url(manifests):
        record = {"shards_dir": _shards_relation(shards, manifests), "files": files}
        storage.write_text(checksums, json.dumps(record, ensure_ascii=False, indent=2))
    return {"uploaded": len(todo), "unchanged": len(names) - len(todo), "removed": stale,
            "shards_dir": shards, "manifest_dir": manifests}


def _listed_versions(paths: set[str]) -> dict[str, object]:
    """The version of every object in the folders `paths` are in, one listing per folder."""
    from cnclip.corpus.runtime.fingerprints import file_version

    versions: dict[str, object] = {}
    for folder in sorted({path.rpartition("/")[0] for path in paths}):
        versions.update({name: file_version(info) for name, info in storage.list_infos(folder)})
    return versions


def _published(path: str, sha256: str, listed: dict[str, object]) -> bool:
    """Whether `path` holds these bytes already: its marker records them, and the object is
    still the one the marker was written for (its version unchanged since)."""
    marker = read_marker(path) or {}
    return marker.get("sha256") == sha256 and path in listed and marker.get("version") == listed[path]


def _remove_stale(shards: str, manifests: str, current: set[str]) -> int:
    """Parts of an earlier publish that this one no longer has (fewer shards, say): removed when
    their marker shows a publish wrote them (the build's own), otherwise reported and left."""
    removed = 0
    for folder, suffix in _part_folders(shards, manifests):
        if not storage.is_url(folder):
            continue
        for name in storage.list_files(folder):
            if not name.endswith(suffix) or name in current or name.rpartition("/")[2].startswith("."):
                continue
            if (read_marker(name) or {}).get("sha256"):
                remove_part(name)
                removed += 1
            else:
                warn(f"{name}: not part of this corpus; remove it: readers would take it for part of the corpus")
    return removed


def _remote_digest(path: str) -> tuple[int, str]:
    digest, size = hashlib.sha256(), 0
    with storage.open_file(path) as stream:
        while chunk := stream.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def published_problems(manifest_dir: str) -> list[str]:
    """One line per published file that is missing, uncommitted or not what checksums.json
    records (read back and hashed), and per part in the corpus's folders that it does not record."""
    try:
        record = json.loads(storage.read_text(storage.join(manifest_dir, CHECKSUMS)))
    except FileNotFoundError:
        return [f"{storage.join(manifest_dir, CHECKSUMS)}: missing (not a finished publish)"]
    except ValueError as err:
        return [f"{storage.join(manifest_dir, CHECKSUMS)}: unreadable ({err})"]
    relation = record.get("shards_dir", "")
    shards = relation if storage.is_url(relation) or relation.startswith("/") else _resolve(manifest_dir, relation)
    problems = []
    for name, entry in sorted(record["files"].items()):
        path = _target(name, shards, manifest_dir)
        if storage.is_url(path) and not is_committed(path):
            problems.append(f"{path}: missing or not committed")
            continue
        size, sha = _remote_digest(path)
        if (size, sha) != (entry["size"], entry["sha256"]):
            problems.append(f"{path}: {size} bytes with SHA-256 {sha[:12]}…, recorded {entry['size']} bytes "
                            f"with {entry['sha256'][:12]}…")
    recorded = {_target(name, shards, manifest_dir) for name in record["files"]}
    for folder, suffix in _part_folders(shards, manifest_dir):
        for path in committed_parts(folder, suffix):
            if path not in recorded:
                problems.append(f"{path}: not recorded in {CHECKSUMS}")
    return problems


def _resolve(url: str, relative: str) -> str:
    scheme, _, path = url.partition("://")
    return f"{scheme}://{posixpath.normpath(posixpath.join(path, relative))}"
