"""Tar members against manifest rows: each shard `shards/NNNNN.tar` holds exactly the samples its
part `samples/NNNNN.parquet` lists (the shard stage writes the two together).

Checksums say the files are the ones the build wrote; this says the build wrote them in agreement,
so a trainer reading the tars and an analysis reading the manifests see the same corpus. It runs
on tars and parts that match checksums.json (damage is reported once, by the checksum check), one
shard's keys in memory at a time.
"""

from __future__ import annotations

import polars as pl

from cnclip.corpus.manifests.integrity import Location, location_in
from cnclip.corpus.runtime import storage

_SHOWN = 3  # keys named per problem line


def sample_key(member: str) -> str:
    """A WebDataset member's sample key: its name up to the first dot of the last component."""
    folder, _, name = member.rpartition("/")
    return f"{folder}/{name.split('.', 1)[0]}" if folder else name.split(".", 1)[0]


def _listed(keys: list[str]) -> str:
    shown = ", ".join(keys[:_SHOWN])
    return shown + (", …" if len(keys) > _SHOWN else "")


def _part_of(tar: Location, manifest_dir: Location) -> Location:
    stem = str(tar).rpartition("/")[2].removesuffix(".tar")
    return location_in(manifest_dir, "samples", f"{stem}.parquet")


def shard_disagreement(tar: Location, members: list[str] | None, part: Location) -> str | None:
    """One line when the tar's samples and the part's rows differ (keys only in one of them, rows
    naming another shard), or the tar is not readable; None when they agree."""
    if members is None:
        return f"{tar}: not a readable tar"
    stem = str(tar).rpartition("/")[2].removesuffix(".tar")
    rows = storage.scan_parquet([part]).select("key", "shard").collect()
    in_tar, in_rows = set(map(sample_key, members)), set(rows["key"].to_list())
    problems = []
    if only_tar := sorted(in_tar - in_rows):
        problems.append(f"{len(only_tar)} sample(s) not in {part} ({_listed(only_tar)})")
    if only_rows := sorted(in_rows - in_tar):
        problems.append(f"{len(only_rows)} row(s) of {part} not in the tar ({_listed(only_rows)})")
    elsewhere = rows.filter(pl.col("shard") != int(stem)) if stem.isdigit() else rows.clear()
    if elsewhere.height:
        named = _listed(elsewhere["key"].to_list())
        problems.append(f"{elsewhere.height} row(s) of {part} name another shard ({named})")
    return f"{tar}: " + "; ".join(problems) if problems else None


def member_problems(manifest_dir: Location, members: dict, damaged: set) -> list[str]:
    """A line per intact tar whose members disagree with its intact samples/ part. `members`: tar
    -> member names (None: unreadable), read while its checksum was checked."""
    problems = []
    for tar, names in sorted(members.items(), key=lambda item: str(item[0])):
        part = _part_of(tar, manifest_dir)
        if tar in damaged or part in damaged:
            continue
        if names is not None and not storage.exists(part):
            problems.append(f"{tar}: no samples part {part} lists its samples")
            continue
        problem = shard_disagreement(tar, names, part)
        if problem:
            problems.append(problem)
    return problems
