"""The download's routing plan, built by the engine: no step holds every row in one process.

Three steps, each a task map or an engine query (so on Spark they run on the executors):
1. per accepted part (a task each): its rows as the download sends them (URLs encoded as
   browsers send them), each with its host and the host's first lane, a hash of the host by
   polars, the same function wherever the task runs (work/download-input/sent/, kept for every
   later round);
2. one query: a host's rows dealt in uid order over its lanes from its first lane (one lane when
   requests to a host are spaced, see download_lanes.py), then each lane cut into parts of
   `samples_per_part` rows in uid order (the routes table); the per-lane part counts, one row per
   lane, number the parts lane by lane on the driver;
3. per img2dataset part (a task each): its rows from the routes table -> its Arrow input; then
   the plan (uid, lane, part), written last, commits the round.

`route` and `write_plan` run the same steps on a frame already in memory (tests, the bench).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import polars as pl

from cnclip.corpus.manifests.schemas import DOWNLOAD_PLAN, DOWNLOAD_ROUTES, DOWNLOAD_SENT
from cnclip.corpus.runtime import storage
from cnclip.corpus.runtime.commit import is_committed
from cnclip.corpus.runtime.engine import Engine, LocalEngine, Table
from cnclip.corpus.runtime.layout import at

# The host of a URL (scheme, optional user, then the host up to a port or path); none: "".
_HOST = r"^[A-Za-z][A-Za-z0-9+.\-]*://(?:[^@/?#\\]*@)?(\[[^\]/]*\]|[^:/?#\\]*)"

# A host's rows over its lanes, from its first lane; a row without a host (file://) over all.
_LANES = """
SELECT uid, url, caption, CAST((first_lane + (ROW_NUMBER() OVER (PARTITION BY host ORDER BY uid) - 1)
       % CASE WHEN host = '' THEN {lanes} ELSE {per_host} END) % {lanes} AS INT) AS lane
FROM sent {chosen}
"""
# Each lane cut into parts of per_part rows in uid order (FLOOR: '/' divides exactly in Spark SQL).
_ROUTES = """
SELECT uid, url, caption, lane,
       CAST(FLOOR((ROW_NUMBER() OVER (PARTITION BY lane ORDER BY uid) - 1) / {per_part}) AS BIGINT) AS lane_part
FROM laned ORDER BY lane, lane_part, uid
"""
_LANE_PARTS = "SELECT lane, MAX(lane_part) + 1 AS parts FROM routes GROUP BY lane ORDER BY lane"
_PLAN = "SELECT uid, lane, CAST({part} AS BIGINT) AS part FROM routes ORDER BY part, uid"


def _to_uri_or_given(url: str) -> str:
    from cnclip.corpus.net.uri import to_uri

    try:
        return to_uri(url)
    except ValueError:  # a host IDNA cannot encode: img2dataset records the failure
        return url


def as_sent(frame: pl.LazyFrame) -> pl.LazyFrame:
    """`url` IDNA- and percent-encoded by the code html/warc links go through (corpus.uri), so
    `/图片.jpg?名字=值`, `例子.中国` and spaces are fetched; only rows with a non-ASCII character, a
    space or a control character pass through Python. The manifests keep the URL as given."""
    odd = pl.col("url").str.contains(r"[^\x21-\x7e]")
    encoded = frame.filter(odd).with_columns(pl.col("url").map_elements(_to_uri_or_given, return_dtype=pl.String))
    return pl.concat([frame.filter(~odd), encoded]).sort("uid")


def hosted(rows: pl.LazyFrame, lanes: int) -> pl.LazyFrame:
    """rows (uid, url, caption) -> with each row's lower-cased host ("" for none) and that host's
    first lane, a hash of the host: the same lane for the same host in every task."""
    host = pl.col("url").str.extract(_HOST, 1).str.to_lowercase().fill_null("")
    return rows.select("uid", "url", "caption", host.alias("host")).with_columns(
        (pl.col("host").hash(seed=0) % lanes).cast(pl.Int64).alias("first_lane"))


@dataclass(frozen=True)
class SentTask:
    accepted: Path | str
    sent: Path | str
    lanes: int


def write_sent(task: SentTask) -> None:
    """Runs as a task: one accepted part as sent, hosted (a part already there is whole: kept)."""
    if is_committed(task.sent):
        return
    rows = storage.scan_parquet(task.accepted).select("url", "caption", "uid").pipe(as_sent)
    DOWNLOAD_SENT.write(hosted(rows, task.lanes), task.sent)


def sent_parts(engine: Engine, accepted: Sequence[Path | str], input_dir: Path | str, lanes: int,
               processes: int | None = None) -> list[Path | str]:
    """Every accepted part as sent (work/download-input/sent/, the same file name), as tasks
    (`processes`: the stage's own worker count on the local engine)."""
    folder = at(input_dir, "sent")
    storage.make_dirs(folder)
    tasks = [SentTask(part, at(folder, Path(str(part)).name), lanes) for part in accepted]
    engine.map_parts(write_sent, tasks, "download: rows as sent", processes)
    return [task.sent for task in tasks]


def routes_query(engine: Engine, sent: Table, lanes: int, per_host: int, per_part: int,
                 only: Table | None = None) -> Table:
    """The routes table (uid, url, caption, lane, lane_part) of the sent rows, or of those whose
    uid is in `only`."""
    semi = "LEFT SEMI JOIN chosen ON sent.uid = chosen.uid" if only is not None else ""
    tables = {"sent": sent} if only is None else {"sent": sent, "chosen": only}
    laned = engine.sql(_LANES.format(lanes=lanes, per_host=per_host, chosen=semi), **tables)
    return engine.sql(_ROUTES.format(per_part=per_part), laned=laned)


def lane_offsets(engine: Engine, routes: Table, first_part: int) -> dict[int, tuple[int, int]]:
    """lane -> (its first part number, its part count): lanes numbered in order from first_part.
    One row per lane comes to the driver."""
    offsets, next_part = {}, first_part
    for lane, parts in engine.rows(engine.sql(_LANE_PARTS, routes=routes)):
        offsets[int(lane)] = (next_part, int(parts))
        next_part += int(parts)
    return offsets


def _part_number(offsets: dict[int, tuple[int, int]]) -> str:
    """SQL: a route's img2dataset part, from its lane's first part (a CASE over the few lanes)."""
    if not offsets:
        return "lane_part"
    cases = " ".join(f"WHEN {lane} THEN {first}" for lane, (first, _) in sorted(offsets.items()))
    return f"CASE lane {cases} END + lane_part"


@dataclass(frozen=True)
class InputTask:
    routes: Path | str
    lane: int
    lane_part: int
    target: Path | str


def write_input(task: InputTask) -> None:
    """Runs as a task: one img2dataset part's rows (its lane's lane_part-th, by uid) from the
    routes table (sorted by lane and part, so the read skips the other row groups) -> its input."""
    from cnclip.corpus.stages.download_lanes import write_input_file

    rows = (storage.scan_parquet(task.routes)
            .filter((pl.col("lane") == task.lane) & (pl.col("lane_part") == task.lane_part))
            .sort("uid").collect())
    write_input_file(rows, task.target)


def plan_round(engine: Engine, sent: Sequence[Path | str], input_dir: Path | str, plan_name: str, lanes: int,
               per_host: int, per_part: int, first_part: int, only: Table | None = None,
               processes: int | None = None) -> list[tuple[int, tuple]]:
    """The round's routes, part inputs and plan (kept when an interrupted run committed it: its parts
    may be downloaded already); returns each lane and its parts, from the plan."""
    from cnclip.corpus.stages.download_lanes import part_name

    plan_path = at(input_dir, plan_name)
    if not is_committed(plan_path):
        routes_path = at(input_dir, plan_name.replace("plan", "routes", 1))
        scanned = engine.scan(list(sent), DOWNLOAD_SENT.columns)
        engine.write(routes_query(engine, scanned, lanes, per_host, per_part, only), routes_path, DOWNLOAD_ROUTES)
        routes = engine.scan([routes_path])
        offsets = lane_offsets(engine, routes, first_part)
        tasks = [InputTask(routes_path, lane, index, at(input_dir, part_name(first + index, ".arrow")))
                 for lane, (first, count) in offsets.items() for index in range(count)]
        engine.map_parts(write_input, tasks, "download: part inputs", processes)
        engine.write(engine.sql(_PLAN.format(part=_part_number(offsets)), routes=routes), plan_path, DOWNLOAD_PLAN)
    query = "SELECT lane, part FROM plan GROUP BY lane, part ORDER BY lane, part"
    lanes_parts: dict[int, list[int]] = {}
    for lane, part in engine.rows(engine.sql(query, plan=engine.scan([plan_path]))):
        lanes_parts.setdefault(int(lane), []).append(int(part))
    return [(lane, tuple(parts)) for lane, parts in sorted(lanes_parts.items())]


def route(rows: pl.DataFrame, lanes: int, per_host: int, per_part: int, first_part: int) -> pl.DataFrame:
    """rows (uid, url, caption) in memory -> with `lane` and `part`, by the queries above."""
    engine = LocalEngine(1)
    routes = routes_query(engine, hosted(rows.lazy(), lanes), lanes, per_host, per_part).collect().lazy()
    part = _part_number(lane_offsets(engine, routes, first_part))
    return engine.sql(f"SELECT uid, url, caption, lane, CAST({part} AS BIGINT) AS part FROM routes "
                      "ORDER BY part, uid", routes=routes).collect()


def write_plan(rows: pl.DataFrame, input_dir: Path | str, plan_name: str, lanes: int, per_host: int,
               per_part: int, first_part: int) -> pl.DataFrame:
    """rows in memory (uid, url, caption, URLs as sent) routed as a round of the stage, on this
    process: their sent part, the routes, the part inputs and the plan, which it returns."""
    folder = at(input_dir, "sent")
    storage.make_dirs(folder)
    sent = at(folder, f"{Path(plan_name).stem}.parquet")
    if not is_committed(at(input_dir, plan_name)):
        DOWNLOAD_SENT.write(hosted(rows.lazy(), lanes), sent)
    plan_round(LocalEngine(1), [sent], input_dir, plan_name, lanes, per_host, per_part, first_part)
    return storage.read_parquet(at(input_dir, plan_name))
