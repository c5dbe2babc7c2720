"""Hash stage: one Parquet part of (uid, phash) per download part, the pHash of each stored image.

Which tar members are a part's is a query over the attempts table, written by the engine as the
members table (work/hash-members.parquet, sorted by part, removed when the tasks are done);
each task reads its part's rows from it, so the driver's task list is one part number per part,
whatever the number of images."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, NamedTuple

import polars as pl

from cnclip.corpus.manifests.schemas import HASH_MEMBERS, HASHES
from cnclip.corpus.ops.phash import iter_tar_images, phash_bytes
from cnclip.corpus.runtime import storage
from cnclip.corpus.runtime.commit import is_committed
from cnclip.corpus.runtime.engine import Engine, default_engine
from cnclip.corpus.runtime.layout import BuildLayout, at
from cnclip.corpus.runtime.stage import Stage, StageContext
from cnclip.corpus.stages.download_attempts import attempts_path, has_attempts

HASH_VERSION = "phash-draft-v1"  # bump when hash values change, so hash parts are recomputed


# A download part's members (HASH_MEMBERS): its successes, the tar member key and the uid of
# each. Written sorted by part, so a task reading one part's rows skips the others' row groups.
_MEMBERS = "SELECT part, key, uid FROM attempts WHERE status = 'success' ORDER BY part, uid"
_PARTS = "SELECT part FROM attempts GROUP BY part ORDER BY part"


class HashTask(NamedTuple):
    """One download part's work; its members are read by the task, not shipped by the driver."""

    tar: Path | str
    members: Path | str  # the members table (HASH_MEMBERS) of every part
    out: Path | str  # the hash part
    part: int


def part_members(members: Path | str, part: int) -> dict[str, int]:
    """member key -> uid of one part's successes (its latest attempts only: the members table
    is read from the attempts table, which holds each row's latest attempt)."""
    frame = storage.scan_parquet(members).filter(pl.col("part") == part).select("key", "uid").collect()
    return dict(zip(frame["key"].to_list(), frame["uid"].to_list(), strict=True))


def hash_download_part(task: HashTask) -> int:
    """img2dataset tar + its successes -> hash part; returns the number of images hashed. A part
    with no success has no tar worth opening and gives an empty part."""
    uid_of = part_members(task.members, task.part)
    keys: list[str] = []

    def images() -> Iterator[bytes]:  # streamed: one image in memory at a time, hashes batched
        if not uid_of:
            return
        with storage.open_file(task.tar) as stream:
            for key, data in iter_tar_images(stream):
                if key in uid_of:  # an image of a row whose latest attempt is elsewhere is not this part's
                    keys.append(key)
                    yield data

    hashes = phash_bytes(images())
    frame = pl.DataFrame(
        {"uid": [uid_of[k] for k in keys], "phash": hashes}, schema={"uid": pl.Int64, "phash": pl.UInt64}
    )
    HASHES.write(frame.sort("uid"), task.out)
    return frame.height


def members_path(hash_dir: Path | str) -> Path | str:
    """Beside hash_dir (`work/hash-members.parquet`): hash_dir's files are the hash parts dedup
    scans."""
    return Path(f"{hash_dir}-members.parquet") if isinstance(hash_dir, Path) else f"{hash_dir}-members.parquet"


def _tasks(engine: Engine, download_dir: Path | str, hash_dir: Path | str) -> list[HashTask]:
    """One task per download part of the attempts table: the driver holds one row per part (its
    number), never the members, which the engine's query writes for the tasks to read."""
    attempts = engine.scan([attempts_path(download_dir)])
    parts = [part for (part,) in engine.rows(engine.sql(_PARTS, attempts=attempts))]
    return [HashTask(at(download_dir, f"{part:05d}.tar"), members_path(hash_dir), at(hash_dir, f"{part:05d}.parquet"),
                     part) for part in parts]


def run_hash_stage(download_dir: Path | str, hash_dir: Path | str, processes: int | None = None,
                   engine: Engine | None = None) -> dict:
    """One task per download part of the attempts table (their latest attempts only) not hashed
    yet; `processes` overrides the engine's. The members table is written afresh before the tasks
    (one a killed run left may predate the attempts)."""
    engine = engine or default_engine()
    storage.make_dirs(hash_dir)
    tasks = _tasks(engine, download_dir, hash_dir) if has_attempts(download_dir) else []
    todo = [t for t in tasks if not is_committed(t.out)]
    if todo:
        attempts = engine.scan([attempts_path(download_dir)])
        engine.write(engine.sql(_MEMBERS, attempts=attempts), members_path(hash_dir), HASH_MEMBERS)
    engine.map_parts(hash_download_part, todo, "hash: pHash of stored images", processes)
    return {"parts": len(tasks)}


class HashStage(Stage):
    """Download parts -> hash parts; its fingerprint covers the hash version. It rejects nothing,
    so the funnel has no row for it. Its workers are `dedup.processes` (default engine.processes)."""

    name = "hash"
    needs = ("download",)
    in_funnel = False

    def extra(self, recipe) -> list:
        return [HASH_VERSION]

    def outputs(self, layout: BuildLayout) -> tuple:
        return (layout.hash_dir, members_path(layout.hash_dir))

    def run(self, context: StageContext) -> dict:
        layout = context.layout
        return run_hash_stage(layout.download_dir, layout.hash_dir, context.recipe.dedup.processes, context.engine)
