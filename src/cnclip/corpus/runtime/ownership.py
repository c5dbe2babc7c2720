"""What a build owns, and one build at a time.

A build writes only into folders it owns: `output_dir` and `manifest_dir` each get a marker
(`.cnclip-build.json`) naming the recipe and the entries the build creates there. A folder
without a marker that already holds anything is the user's: the build refuses it before writing
a byte. `--fresh` (`clean`) removes the entries a marker records and nothing else, so a file the
user keeps beside a build (notes, another tool's output) survives.

A second build of the same `output_dir` meets a lock (`flock` on `.cnclip-build.lock`) and stops
with a one-line error naming the holder's PID. The kernel drops a flock when its holder dies, so
a lock left by a killed build is simply taken over.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator

from cnclip._common.atomic import write_json_atomic
from cnclip._common.errors import CnclipError
from cnclip.corpus.runtime.layout import BuildLayout

MARKER = ".cnclip-build.json"
LOCK = ".cnclip-build.lock"

# Locks this process holds, by lock path: (fd, depth). build() holds it around the stage calls,
# which take it again; a second flock on a new fd would block against ourselves.
_held: dict[Path | str, list] = {}  # locks this process holds (a local path or a URL) -> [handle, depth]


class OwnershipError(CnclipError, RuntimeError):
    """A folder the build would write into holds files it did not write, or another recipe's build."""


class BuildLockedError(CnclipError, RuntimeError):
    """Another build is running on the same output_dir."""


def owned_entries(layout: BuildLayout) -> dict[Path, list[str]]:
    """Each folder the build writes into -> the names it creates there (both, if they are one)."""
    entries: dict[Path, list[str]] = {}
    for folder, paths in ((layout.output_dir, layout.output_entries), (layout.manifest_dir, layout.manifest_entries)):
        names = entries.setdefault(folder, [])
        names += [p.name for p in paths if p.name not in names]
    return entries


# The marker's rules, whatever filesystem the folder is on (local here, a URL in published_ownership.py).


def parse_marker(read: Callable[[], str | bytes], path: object) -> dict:
    """A marker's record, or OwnershipError naming `path` when it is unreadable or not a marker."""
    try:
        marker = json.loads(read())
    except (OSError, ValueError) as err:
        raise OwnershipError(f"{path}: unreadable build marker ({err}); remove it only if this folder is "
                             "a cnclip build") from None
    if not isinstance(marker, dict) or not isinstance(marker.get("owns"), list):
        raise OwnershipError(f"{path}: not a cnclip build marker (no 'owns' list)")
    return marker


def marker_record(recipe_name: str, names: list[str]) -> dict:
    return {"tool": "cnclip", "recipe": recipe_name, "owns": names}


def refuse_other_recipe(folder: object, marker: dict, recipe_name: str, consequence: str) -> None:
    """OwnershipError when `folder`'s marker is another recipe's."""
    if marker.get("recipe") != recipe_name:
        raise OwnershipError(f"{folder}: holds the build of recipe {marker.get('recipe')!r}, not "
                             f"{recipe_name!r}; {consequence}")


def refuse_foreign(folder: object, names: list[str], ours: set[str]) -> None:
    """OwnershipError when an unmarked folder holds names this build does not write."""
    foreign = sorted(name for name in names if name not in ours)
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise OwnershipError(f"{folder}: already holds files this build did not write ({shown}); "
                             "choose an empty or new folder")


def removable(marker: dict) -> list[str]:
    """The names a marker records that may be removed: a hand-edited marker never widens it."""
    return [name for name in marker["owns"] if name and "/" not in name and name not in (".", "..", LOCK, MARKER)]


def _read_marker(folder: Path) -> dict | None:
    path = folder / MARKER
    if not path.exists():
        return None
    return parse_marker(lambda: path.read_text(encoding="utf-8"), path)


def check_ownership(layout: BuildLayout, recipe_name: str) -> None:
    """Refuse, before anything is written, folders that hold files this build did not write."""
    for folder in owned_entries(layout):
        marker = _read_marker(folder)
        if marker is not None:
            refuse_other_recipe(folder, marker, recipe_name, "give this recipe its own output_dir and manifest_dir")
            continue
        if folder.is_file():
            raise OwnershipError(f"{folder}: is a file, not a folder")
        # The lock file may be a concurrent first build's (settled by the lock itself); a
        # manifest_dir nested in output_dir is checked on its own.
        ours = {LOCK} | {other.relative_to(folder).parts[0] for other in owned_entries(layout)
                         if folder in other.parents}
        refuse_foreign(folder, [p.name for p in folder.iterdir()] if folder.is_dir() else [], ours)


def claim(layout: BuildLayout, recipe_name: str) -> None:
    """Write the markers (after check_ownership, under the lock): from now on the entries are ours."""
    for folder, names in owned_entries(layout).items():
        marker = _read_marker(folder)
        if marker is None or sorted(marker["owns"]) != sorted(names):
            write_json_atomic(folder / MARKER, marker_record(recipe_name, names))


def remove_owned(layout: BuildLayout, recipe_name: str, forget: bool = False) -> None:
    """Remove what the markers record (forget: the markers too, and folders left empty)."""
    markers = {folder: _read_marker(folder) for folder in owned_entries(layout)}
    for folder, marker in markers.items():
        if marker is not None:
            refuse_other_recipe(folder, marker, recipe_name, "nothing removed")
    for folder, marker in markers.items():
        if marker is None:
            continue  # nothing here is ours
        for name in removable(marker):
            target = folder / name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            elif target.exists() or target.is_symlink():
                target.unlink()
        if forget:
            (folder / MARKER).unlink(missing_ok=True)
    if forget:
        for folder in sorted(owned_entries(layout), key=lambda p: len(p.parts), reverse=True):
            with contextlib.suppress(OSError):
                if folder.is_dir() and not any(p.name != LOCK for p in folder.iterdir()):
                    (folder / LOCK).unlink(missing_ok=True)
                    folder.rmdir()


def has_marker(layout: BuildLayout) -> bool:
    return any((folder / MARKER).exists() for folder in owned_entries(layout))


def _holder(path: Path) -> str:
    try:
        pid = path.read_text(encoding="utf-8").strip()
    except OSError:
        pid = ""
    return f"PID {pid}" if pid.isdigit() else "another process"


@contextlib.contextmanager
def held_once(key: Path | str, take: Callable[[], Any], release: Callable[[Any], None]) -> Iterator[None]:
    """Hold a lock once per process: the first hold of `key` calls `take` (which raises when
    another build has it) and its end `release`; nested holds only count. build() holds the lock
    around the stage calls, which take it again."""
    if key in _held:
        _held[key][1] += 1
        try:
            yield
        finally:
            _held[key][1] -= 1
        return
    _held[key] = [take(), 1]
    try:
        yield
    finally:
        release(_held.pop(key)[0])


@contextlib.contextmanager
def build_lock(output_dir: Path | str) -> Iterator[None]:
    """Hold `output_dir`'s build lock (re-entrant within this process); a URL's is a lock object
    (url_lock.py)."""
    from cnclip.corpus.runtime import storage

    if storage.is_url(output_dir):
        from cnclip.corpus.runtime.url_lock import release_url_lock, take_url_lock, url_lock_path

        path = url_lock_path(str(output_dir))
        with held_once(path, lambda: take_url_lock(str(output_dir), path), lambda token: release_url_lock(path, token)):
            yield
        return
    path = (Path(output_dir) / LOCK).absolute()

    def take() -> int:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise BuildLockedError(f"{output_dir}: another build ({_holder(path)}) is running on this output_dir; "
                                   "wait for it to end") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        return fd

    def release(fd: int) -> None:
        os.ftruncate(fd, 0)  # released: no stale PID for the next reader
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)

    with held_once(path, take, release):
        yield


@contextlib.contextmanager
def owned_build(layout: BuildLayout, recipe_name: str) -> Iterator[None]:
    """Check the folders are ours (writing nothing if not), take the lock, then write the markers."""
    check_ownership(layout, recipe_name)
    with build_lock(layout.output_dir):
        claim(layout, recipe_name)
        yield
