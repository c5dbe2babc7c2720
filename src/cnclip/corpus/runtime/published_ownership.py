"""What a build owns where it publishes to a URL: the ownership markers of ownership.py, on an
object store.

A URL `output_dir` and `manifest_dir` each get `.cnclip-build.json` naming the recipe and the
entries a publish creates there (`shards`; `samples`, `rejected`, `funnel.json`,
`checksums.json`). A prefix without a marker that already holds anything is the user's, and a
prefix marked by another recipe is that recipe's: the build refuses either before it runs a stage
or writes a byte. `clean` removes the entries a marker records, and the marker, nothing else.
A URL work_dir is marked the same way (it owns `work`), and holds the build lock object
(url_lock.py); with a local work_dir the lock stays local, and two machines publishing to one
prefix are not stopped.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from cnclip.corpus.runtime import storage
from cnclip.corpus.runtime.ownership import (
    LOCK,
    MARKER,
    marker_record,
    parse_marker,
    refuse_foreign,
    refuse_other_recipe,
    removable,
)

if TYPE_CHECKING:
    from cnclip.corpus.recipe import Recipe

_OUTPUT_ENTRIES = ["shards"]
_MANIFEST_ENTRIES = ["samples", "rejected", "funnel.json", "checksums.json"]
_WORK_ENTRIES = ["work"]


def published_entries(recipe: "Recipe") -> dict[str, list[str]]:
    """Each URL folder a publish writes into -> the names it creates there (both, if one)."""
    entries: dict[str, list[str]] = {}
    folders = [(recipe.output_dir, _OUTPUT_ENTRIES), (recipe.manifest_dir, _MANIFEST_ENTRIES),
               (recipe.work_dir or "", _WORK_ENTRIES)]
    for folder, names in folders:
        if storage.is_url(folder):
            owned = entries.setdefault(str(folder), [])
            owned += [name for name in names if name not in owned]
    return entries


def _read_marker(folder: str) -> dict | None:
    path = storage.join(folder, MARKER)
    if not storage.exists(path):
        return None
    return parse_marker(lambda: storage.read_bytes(path), path)


def _top_level(folder: str) -> list[str]:
    """The names directly under a URL folder (objects and sub-prefixes); none if it is not there."""
    fs, stripped = storage.filesystem(folder)
    try:
        return sorted(name.rstrip("/").rpartition("/")[2] for name in fs.ls(stripped, detail=False))
    except FileNotFoundError:
        return []


def check_published(recipe: "Recipe") -> None:
    """Refuse, before anything is written, URL folders that hold what this build did not write."""
    entries = published_entries(recipe)
    for folder in entries:
        marker = _read_marker(folder)
        if marker is not None:
            refuse_other_recipe(folder, marker, recipe.name, "give this recipe its own output_dir and manifest_dir")
            continue
        # A manifest_dir nested in output_dir is checked on its own; the lock object may be a
        # concurrent first build's (settled by the lock itself).
        ours = {MARKER, LOCK} | {other[len(folder) + 1:].split("/", 1)[0] for other in entries
                           if other.startswith(folder + "/")}
        refuse_foreign(folder, _top_level(folder), ours)


def claim_published(recipe: "Recipe") -> None:
    """Write the markers (after check_published): from now on the entries are this build's."""
    for folder, names in published_entries(recipe).items():
        marker = _read_marker(folder)
        if marker is None or sorted(marker["owns"]) != sorted(names):
            storage.write_text(storage.join(folder, MARKER),
                               json.dumps(marker_record(recipe.name, names)))


def remove_published(recipe: "Recipe", forget: bool = True) -> None:
    """Remove what this recipe's markers record, then (forget) the markers; another recipe's: nothing."""
    markers = {folder: _read_marker(folder) for folder in published_entries(recipe)}
    for folder, marker in markers.items():
        if marker is not None:
            refuse_other_recipe(folder, marker, recipe.name, "nothing removed")
    for folder, marker in markers.items():
        if marker is None:
            continue
        for name in removable(marker):
            storage.remove(storage.join(folder, name))
        if forget:
            storage.remove(storage.join(folder, MARKER))
