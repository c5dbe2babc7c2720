"""Download stage: img2dataset on the rows the text stage accepted.

img2dataset does the fetching, resizing and size/aspect checks; this module maps the recipe onto
its downloader and adds what it lacks: URLs encoded as browsers send them, rows routed by host to
worker lanes that each run img2dataset with the network guard installed in-process in front of
every request, file:// included (download_lanes.py, net/opener.py), threads lowered to fit
download.memory_budget, OpenCV told the recipe's pixel limit, so a decompression bomb is refused
from its header before any pixel memory is allocated, and img2dataset's results read once into
the attempts table (download_attempts.py) that every later stage reads.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

from cnclip._common.atomic import remove_temporaries
from cnclip._common.console import info, stage_progress, summary_table
from cnclip._common.mainguard import require_main_guard
from cnclip.corpus.net.policy import GuardConfig
from cnclip.corpus.recipe import Recipe, SampleWebSource
from cnclip.corpus.runtime import storage
from cnclip.corpus.runtime.commit import committed_parts
from cnclip.corpus.runtime.engine import Engine, Table, default_engine
from cnclip.corpus.runtime.layout import BuildLayout, at
from cnclip.corpus.runtime.stage import Stage, StageContext
from cnclip.corpus.stages.download_attempts import attempts_path, build_attempts


@contextlib.contextmanager
def serve_sample_webs(recipe: Recipe) -> Iterator[None]:
    """Start the built-in sample web of every `sample_web` source for the duration of a stage."""
    from cnclip.corpus.sources.sample_web import SampleWebServer

    layout = BuildLayout.of(recipe)
    with contextlib.ExitStack() as stack:
        for source in recipe.sources:
            if isinstance(source, SampleWebSource):
                stack.enter_context(SampleWebServer(layout.sample_web_dir / source.name / "site", source.port))
        yield


def download_threads(recipe: Recipe) -> tuple[int, str | None]:
    """The threads per process that fit download.memory_budget (see download_memory)."""
    from cnclip.corpus.runtime.memory import threads_within_budget

    d = recipe.download
    return threads_within_budget(d.processes, d.threads, recipe.image.max_pixels, d.max_response_bytes,
                                 d.memory_budget)


def img2dataset_arguments(recipe: Recipe) -> dict:
    """The recipe as img2dataset.download's arguments. Each lane builds img2dataset's downloader
    from them (download_lanes.py); url_list, processes_count, distributor and incremental_mode are
    what a plain img2dataset run of the same rows would take (the bench runs one)."""
    layout = BuildLayout.of(recipe)
    image, download = recipe.image, recipe.download
    return dict(
        url_list=str(layout.download_input_dir),
        input_format="parquet",
        url_col="url",
        caption_col="caption",
        save_additional_columns=["uid"],
        output_format="webdataset",
        output_folder=str(layout.download_dir),
        processes_count=download.processes,
        thread_count=download_threads(recipe)[0],
        number_sample_per_shard=download.samples_per_part,
        image_size=image.size,
        resize_mode=image.resize_mode,
        resize_only_if_bigger=False,
        encode_format=image.encode_format,
        encode_quality=image.encode_quality,
        min_image_size=image.min_side,
        max_image_area=float(image.max_pixels),
        max_aspect_ratio=image.max_aspect_ratio,
        timeout=download.timeout,
        retries=download.retries,
        extract_exif=False,
        compute_hash="sha256",
        distributor="multiprocessing",
        enable_wandb=False,
        incremental_mode="incremental",
        user_agent_token=download.user_agent_token,
        # An empty list would switch the X-Robots-Tag opt-out off; img2dataset reads None as its defaults.
        disallowed_header_directives=download.disallowed_header_directives or None,
    )


def guard_config(recipe: Recipe) -> GuardConfig:
    from dataclasses import replace

    from cnclip.corpus.sources.stored import own_image_root
    from cnclip.corpus.stages.download_lanes import lanes_per_host

    config = GuardConfig.from_settings(recipe.download, request_timeout=recipe.download.timeout)
    own = own_image_root(recipe)
    if own is not None:  # the images the build stored itself (work/sources/): its own folder
        config = replace(config, allow_local_files=(*config.allow_local_files, str(own)))
    return config.spread(lanes_per_host(config, recipe.download.processes))


def _download(recipe: Recipe, engine: Engine, plan_name: str, first_part: int, only: Table | None = None) -> dict:
    """Route the accepted rows (those of `only`, a table of uids) to lanes, or take the plan an
    interrupted run left, then run img2dataset in each lane's worker behind the guard; returns
    the guard's counts. The routing runs as the engine's tasks and queries (download_routing.py)."""
    require_main_guard("the download stage (img2dataset)")  # the lanes run in spawned workers
    from cnclip.corpus.stages.download_lanes import run_lanes
    from cnclip.corpus.stages.download_routing import plan_round, sent_parts

    layout = BuildLayout.of(recipe)
    # OpenCV checks its pixel limit on the header; albumentations (imported by img2dataset)
    # would otherwise call PyPI from every worker. Spawned workers inherit both.
    os.environ["OPENCV_IO_MAX_IMAGE_PIXELS"] = str(recipe.image.max_pixels)
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    config = guard_config(recipe)
    lowered = download_threads(recipe)[1]
    if lowered:
        info(lowered)
    storage.make_dirs(layout.download_input_dir)
    if not storage.is_url(layout.download_input_dir):  # an object store keeps no half-written inputs
        remove_temporaries(layout.download_input_dir)
    lanes = recipe.download.processes
    accepted = committed_parts(layout.text_accepted_dir, ".parquet")
    sent = sent_parts(engine, accepted, layout.download_input_dir, lanes, lanes)
    plan = plan_round(engine, sent, layout.download_input_dir, plan_name, lanes, config.lanes_per_host,
                      recipe.download.samples_per_part, first_part, only, lanes)
    arguments = img2dataset_arguments(recipe)
    with serve_sample_webs(recipe), _parts_progress(layout.download_dir, [p for _, parts in plan for p in parts]):
        return run_lanes(plan, layout.download_input_dir, arguments, config, lanes, engine, log=download_log(layout))


def download_log(layout: BuildLayout) -> Path | None:
    """Where img2dataset's own prints go: `work/download.log`, appended by every attempt (None on
    a URL work_dir: nothing local to append to)."""
    return None if storage.is_url(layout.work) else Path(layout.work) / "download.log"


@contextlib.contextmanager
def _parts_progress(output_dir: Path | str, parts: list[int]) -> Iterator[None]:
    """A progress bar of img2dataset parts done (it writes a part's stats file last), polled."""
    import threading

    from cnclip.corpus.stages.download_lanes import done_parts

    before = len(done_parts(output_dir))
    total = len(set(parts) - done_parts(output_dir))
    stop = threading.Event()
    with stage_progress("download: img2dataset parts", total=total) as advance:

        def poll() -> None:
            shown = 0
            while not stop.wait(0.5):
                done = len(done_parts(output_dir)) - before
                advance(done - shown)
                shown = done

        watcher = threading.Thread(target=poll, daemon=True)
        watcher.start()
        try:
            yield
        finally:
            stop.set()
            watcher.join()


def _statuses(download_dir: Path | str, engine: Engine) -> dict:
    query = "SELECT status, COUNT(*) AS n FROM attempts GROUP BY status ORDER BY status"
    return dict(engine.rows(engine.sql(query, attempts=engine.scan([attempts_path(download_dir)]))))


def run_download_stage(recipe: Recipe, engine: Engine | None = None) -> dict:
    """Every accepted row downloaded once; after a crash only parts without their stats are redone.
    `engine`: the build's (the routing's and the attempts table's tasks and queries, and the lanes,
    run on it: on Spark, its executors)."""
    layout = BuildLayout.of(recipe)
    engine = engine or default_engine()
    if not committed_parts(layout.text_accepted_dir, ".parquet"):
        info("download: no rows to download")
        build_attempts(layout.download_dir, engine, recipe.download.processes)
        return {"by_status": {}, "retries": 0}
    guard = _download(recipe, engine, "plan.parquet", first_part=0)
    build_attempts(layout.download_dir, engine, recipe.download.processes)
    return {"by_status": _statuses(layout.download_dir, engine), "retries": 0, "guard": guard}


def _plan_names(input_dir: Path | str) -> list[str]:
    """The committed plans of every round so far: files, or on Spark folders of parts (a plan's
    name is the engine's table name either way)."""
    from cnclip.corpus.runtime.commit import is_committed

    if storage.is_url(input_dir):
        names = [Path(p).name for p in committed_parts(input_dir, ".parquet")]
    else:
        names = [p.name for p in Path(input_dir).iterdir()] if Path(input_dir).is_dir() else []
    return sorted(n for n in names if n.startswith("plan") and n.endswith(".parquet")
                  and is_committed(at(input_dir, n)))


def _quoted(values: list[str]) -> str:
    return ", ".join("'" + value.replace("'", "''") + "'" for value in values)


def retry_failed(recipe: Recipe, previous: dict, engine: Engine | None = None) -> dict:
    """Download again only the rows whose latest attempt failed for a transient reason
    (timeouts, 5xx, 429, DNS, refused connections); their new results are added as new parts,
    numbered after every earlier one, and the attempts table then holds their latest attempt."""
    from cnclip.corpus.net.reasons import TRANSIENT

    layout = BuildLayout.of(recipe)
    engine = engine or default_engine()
    query = f"SELECT uid FROM attempts WHERE status <> 'success' AND reason IN ({_quoted(sorted(TRANSIENT))})"
    transient = engine.sql(query, attempts=engine.scan([attempts_path(layout.download_dir)]))
    ((retried,),) = engine.rows(engine.sql("SELECT COUNT(*) FROM transient", transient=transient))
    if retried == 0:
        info("download: no transient failures to retry")
        return previous
    info(f"download: retrying {retried} rows that failed for transient reasons")
    attempt = previous.get("retries", 0) + 1
    # img2dataset deletes each part's input once done: the plans say which numbers are taken.
    plans = [at(layout.download_input_dir, name) for name in _plan_names(layout.download_input_dir)]
    ((last,),) = engine.rows(engine.sql("SELECT MAX(part) FROM plans", plans=engine.scan(plans)))
    guard = _download(recipe, engine, f"plan-retry-{attempt}.parquet", (last or 0) + 1, transient)
    build_attempts(layout.download_dir, engine, recipe.download.processes)
    return {"by_status": _statuses(layout.download_dir, engine), "retries": attempt, "retried": retried,
            "guard": guard}


# Accepted rows img2dataset never reported, and those whose latest attempt failed (its reason
# and the stripped message come with the attempts table).
_NOT_ATTEMPTED = """
SELECT a.*, 'download' AS stage, 'download:not_attempted' AS reason,
       'img2dataset reported no status for this row' AS detail
FROM accepted a {unreported}
"""
_FAILED = """
SELECT a.*, 'download' AS stage, t.reason, t.detail FROM accepted a JOIN attempts t ON a.uid = t.uid
WHERE t.status <> 'success'
"""


class DownloadStage(Stage):
    """Accepted rows -> img2dataset's parts (images in tars, a parquet of results per part);
    covers the image and download settings."""

    name = "download"
    needs = ("text",)
    sections = ("image", "download")

    def outputs(self, layout: BuildLayout) -> tuple:
        return (layout.download_dir, layout.download_input_dir)

    def run(self, context: StageContext) -> dict:
        return run_download_stage(context.recipe, context.engine)

    def report(self, summary: dict):
        """img2dataset's rows by status, then the network guard's requests by outcome."""
        rows = [(status, count) for status, count in summary["by_status"].items()]
        rows += [(f"guard: {outcome}", count) for outcome, count in summary.get("guard", {}).items()]
        return summary_table(f"download: {sum(summary['by_status'].values())} rows attempted", rows,
                             ("status (guard: requests)", "count"))

    def rejects(self, layout: BuildLayout, engine: Engine, tables: dict[str, Table]) -> list[tuple[str, Table]]:
        accepted, attempts = tables["accepted"], tables["attempts"]
        if attempts is None:
            return [("download.parquet", engine.sql(_NOT_ATTEMPTED.format(unreported=""), accepted=accepted))]
        unreported = "LEFT ANTI JOIN attempts t ON a.uid = t.uid"
        query = f"{_NOT_ATTEMPTED.format(unreported=unreported)} UNION ALL {_FAILED}"
        return [("download.parquet", engine.sql(query, accepted=accepted, attempts=attempts))]
