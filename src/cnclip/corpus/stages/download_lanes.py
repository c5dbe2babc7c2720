"""The download's lanes: rows routed by host to worker processes, each running img2dataset's
downloader in-process behind the guarded opener (net/opener.py).

A lane is one worker's share of the rows; its img2dataset parts run one after the other in that
worker, each with img2dataset's own threads. All rows of a host go to the same lanes: one lane
when the recipe spaces requests to a host (`per_host_delay` > 0, so the spacing is exact), or
`min(lanes, per_host_concurrency)` lanes when it does not, each lane holding its share of the
host's concurrency (and of a robots.txt Crawl-delay). Either way the per-host limits hold across
processes with no state shared between them, here as on a cluster. `file://` rows have no host
and are spread over every lane.

The routing (download_routing.py, as engine tasks and queries) is written once per attempt as
`plan.parquet` (uid, lane, part) beside the part inputs, after them; a resumed run reuses it
and redoes only the parts without img2dataset's `_stats.json`, as img2dataset's incremental
mode would. On a URL work_dir img2dataset writes its parts through fsspec; each of its files is
one object, whole once it is there, and the stats file, written last, is what commits a part.

What img2dataset prints in a lane (a failed sample's traceback, its messages) is appended to the
build's `work/download.log`, not the terminal: the lane's stdout and stderr descriptors point
there while it downloads (library_log.output_to). A URL work_dir has no local file for it.
"""

from __future__ import annotations

import collections
import math
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional, Sequence

import polars as pl

from cnclip._common.atomic import atomic_path
from cnclip._common.library_log import output_to
from cnclip.corpus.net.policy import GuardConfig
from cnclip.corpus.runtime import storage
from cnclip.corpus.runtime.engine import Engine, IsolatedMaps

# img2dataset's names: `{part:05d}.tar`, `.parquet`, `_stats.json` (its oom_shard_count default).
PART_DIGITS = 5


def lanes_per_host(config: GuardConfig, lanes: int) -> int:
    """How many lanes one host's rows are spread over (see the module docstring)."""
    return 1 if config.per_host_delay > 0 else max(1, min(lanes, config.per_host_concurrency))


def part_name(part: int, suffix: str) -> str:
    return f"{part:0{PART_DIGITS}d}{suffix}"


def done_parts(output_dir: Path | str) -> set[int]:
    """The parts img2dataset finished in `output_dir` (their stats file, written last, is there)."""
    names = (Path(name).name for name in storage.list_files(output_dir))
    return {int(name.removesuffix("_stats.json")) for name in names
            if name.endswith("_stats.json") and name.removesuffix("_stats.json").isdigit()}


def write_input_file(frame: pl.DataFrame, path: Path | str) -> None:
    """One part's input (Arrow IPC): renamed into place locally; one PUT, whole, on a URL."""
    rows = frame.select("uid", "caption", "url")
    if storage.is_url(path):
        import io

        buffer = io.BytesIO()
        rows.write_ipc(buffer, compression="uncompressed")
        storage.write_bytes(path, buffer.getvalue())
        return
    with atomic_path(path) as tmp:
        rows.write_ipc(tmp, compression="uncompressed")


@dataclass(frozen=True)
class LaneTask:
    lane: int
    parts: tuple[int, ...]
    input_dir: str
    arguments: dict  # img2dataset_arguments(recipe)
    config: GuardConfig
    parent: Optional[int] = None  # the build's pid, when the lane runs in a worker of its own
    log: Optional[str] = None  # where img2dataset's prints go (None: left on the terminal)


def _downloader(arguments: dict):
    """img2dataset's Downloader as its download() builds it, for the recipe's arguments."""
    from img2dataset.downloader import Downloader
    from img2dataset.resizer import Resizer
    from img2dataset.writer import WebDatasetSampleWriter

    a = arguments
    directives = a["disallowed_header_directives"]
    directives = ["noai", "noimageai", "noindex", "noimageindex"] if directives is None else directives
    resizer = Resizer(image_size=a["image_size"], resize_mode=a["resize_mode"],
                      resize_only_if_bigger=a["resize_only_if_bigger"], upscale_interpolation="lanczos",
                      downscale_interpolation="area", encode_quality=a["encode_quality"],
                      encode_format=a["encode_format"], skip_reencode=False, disable_all_reencoding=False,
                      min_image_size=a["min_image_size"], max_image_area=a["max_image_area"],
                      max_aspect_ratio=a["max_aspect_ratio"], blurrer=None)
    return Downloader(
        sample_writer_class=WebDatasetSampleWriter, resizer=resizer, thread_count=a["thread_count"],
        save_caption=True, extract_exif=a["extract_exif"], output_folder=a["output_folder"],
        column_list=["uid", "caption", "url"], timeout=a["timeout"],
        number_sample_per_shard=a["number_sample_per_shard"], oom_shard_count=PART_DIGITS,
        compute_hash=a["compute_hash"], verify_hash_type=None, encode_format=a["encode_format"],
        retries=a["retries"], user_agent_token=a["user_agent_token"],
        disallowed_header_directives=directives or None, blurring_bbox_col=None,
    )


def _exit_with_parent(parent: int) -> None:
    """A lane outliving a killed build would go on writing parts the resumed build writes too."""
    import threading

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def run_lane(task: LaneTask) -> dict[str, int]:
    """One worker: the guarded opener installed, then each part not yet done (img2dataset
    retries a part that raised once, as its max_shard_retry default)."""
    if task.parent is not None:
        _exit_with_parent(task.parent)
    # Set here too: a lane on a cluster's executor does not inherit the build's environment.
    if math.isfinite(task.arguments["max_image_area"]):
        os.environ["OPENCV_IO_MAX_IMAGE_PIXELS"] = str(int(task.arguments["max_image_area"]))
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    with output_to(task.log, f"download lane {task.lane} (pid {os.getpid()}), parts {list(task.parts)}"):
        return _download_parts(task)


def _download_parts(task: LaneTask) -> dict[str, int]:
    """The lane's parts not yet done, img2dataset's imports included (what they print is logged)."""
    from cnclip.corpus.net.opener import guarded_urlopen

    downloader = _downloader(task.arguments)
    output = task.arguments["output_folder"]
    with guarded_urlopen(task.config) as policy:
        done = done_parts(output)
        for part in task.parts:
            if part in done:
                continue
            source = storage.join(task.input_dir, part_name(part, ".arrow"))
            for _ in range(2):
                if downloader((part, source))[0]:
                    break
        return policy.stats()


def lanes_of(plan: pl.DataFrame) -> list[tuple[int, tuple[int, ...]]]:
    """A plan in memory (a test's) -> each lane and its parts, as download_routing.plan_round gives them."""
    return [(lane, tuple(parts)) for lane, parts in
            plan.group_by("lane").agg(pl.col("part").unique().sort()).sort("lane").rows()]


def lane_tasks(lanes: pl.DataFrame | Sequence[tuple[int, tuple[int, ...]]], input_dir: Path | str, arguments: dict,
               config: GuardConfig, log: Optional[Path | str] = None) -> list[LaneTask]:
    """One task per lane, of its parts (from plan_round, or a plan in memory)."""
    if isinstance(lanes, pl.DataFrame):
        lanes = lanes_of(lanes)
    log = None if log is None else str(log)
    return [LaneTask(lane, tuple(parts), str(input_dir), arguments, config, log=log) for lane, parts in lanes]


def run_lanes(lanes: Sequence[tuple[int, tuple[int, ...]]], input_dir: Path | str, arguments: dict,
              config: GuardConfig, processes: int, engine: Engine | None = None,
              log: Optional[Path | str] = None) -> dict[str, int]:
    """Every lane of the plan, each in a fresh spawned worker, `processes` at a time; the guard's
    counts summed. Fresh even for a single lane: OpenCV reads OPENCV_IO_MAX_IMAGE_PIXELS once, when
    it loads, and the installed opener is process-wide, so neither may come from the caller's
    process (a second build in the same Python with another pixel limit, the caller's own urllib).
    An engine with isolated maps (Spark) runs each lane as a task of its own, in a process it starts.
    `log`: the file img2dataset's prints go to (a local path every lane's process can write)."""
    storage.make_dirs(arguments["output_folder"])
    totals: collections.Counter = collections.Counter()
    if isinstance(engine, IsolatedMaps):
        tasks = lane_tasks(lanes, input_dir, arguments, config, log)
        for stats in engine.map_isolated(run_lane, tasks, "download: lanes"):
            totals.update(stats)
        return dict(sorted(totals.items()))
    tasks = [replace(task, parent=os.getpid()) for task in lane_tasks(lanes, input_dir, arguments, config, log)]
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max(1, min(processes, len(tasks))), mp_context=context) as pool:
        for stats in pool.map(run_lane, tasks):
            totals.update(stats)
    return dict(sorted(totals.items()))
