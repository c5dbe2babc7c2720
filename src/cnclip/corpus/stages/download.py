"""Download stage: img2dataset on the rows the text stage accepted.

img2dataset does the fetching, resizing and size/aspect checks; this module maps the recipe onto
its Python API and adds what it lacks: URLs encoded as browsers send them, the guard proxy in
front of every request (file:// included), threads lowered to fit download.memory_budget, and
OpenCV told the recipe's pixel limit, so a decompression bomb is refused from its header before
any pixel memory is allocated.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

import polars as pl

from cnclip._common.atomic import remove_temporaries
from cnclip._common.mainguard import require_main_guard

from cnclip.corpus.runtime.engine import Engine, Table
from cnclip.corpus.runtime.layout import BuildLayout
from cnclip.corpus.runtime.stage import Stage, StageContext
from cnclip.corpus.runtime.state import write_parquet_atomic
from cnclip.corpus.net.uri import to_uri
from cnclip._common.console import info, stage_progress
from cnclip.corpus.recipe import Recipe, SampleWebSource


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


def _to_uri_or_given(url: str) -> str:
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


def write_download_input(layout: BuildLayout) -> Path:
    """One input part per accepted part, rewritten every run: cheap beside the downloads, and never
    stale after the text stage reran (parts without an accepted part are removed)."""
    folder = layout.download_input_dir
    folder.mkdir(parents=True, exist_ok=True)
    remove_temporaries(folder)
    accepted = sorted(layout.text_accepted_dir.glob("*.parquet"))
    for stale in set(folder.glob("*.parquet")) - {folder / p.name for p in accepted}:
        stale.unlink()
    for part in accepted:
        write_parquet_atomic(as_sent(pl.scan_parquet(part).select("url", "caption", "uid")).collect(),
                             folder / part.name)
    return folder


def img2dataset_arguments(recipe: Recipe) -> dict:
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


def _img2dataset(recipe: Recipe, **overrides) -> dict:
    """Run img2dataset behind the guard proxy (spawned workers inherit the environment)."""
    require_main_guard("the download stage (img2dataset)")  # its pool spawns workers
    from img2dataset import download

    from cnclip.corpus.net.proxy import GuardProxy, ProxyConfig, proxy_environment

    # OpenCV checks its pixel limit on the header; albumentations (imported by img2dataset)
    # would otherwise call PyPI from every worker.
    os.environ["OPENCV_IO_MAX_IMAGE_PIXELS"] = str(recipe.image.max_pixels)
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    config = ProxyConfig.from_settings(recipe.download, request_timeout=recipe.download.timeout)
    lowered = download_threads(recipe)[1]
    if lowered:
        info(lowered)
    arguments = {**img2dataset_arguments(recipe), "timeout": config.client_timeout, **overrides}
    with (serve_sample_webs(recipe), GuardProxy(config) as proxy, proxy_environment(proxy),
          _parts_progress(Path(arguments["output_folder"]), arguments["url_list"], recipe.download.samples_per_part)):
        # The proxy enforces the recipe's timeout per request; the client waits longer so that a
        # request queued for its host's turn is not abandoned early.
        download(**arguments)
        return proxy.stats()


@contextlib.contextmanager
def _parts_progress(output_dir: Path, url_list: str, samples_per_part: int) -> Iterator[None]:
    """A progress bar of img2dataset parts done (it writes a part's stats file last), polled."""
    import threading

    listed = Path(url_list)
    inputs = sorted(listed.glob("*.parquet")) if listed.is_dir() else [listed]
    # img2dataset cuts each input file into parts of samples_per_part rows.
    total = sum(-(-pl.scan_parquet(p).select(pl.len()).collect().item() // samples_per_part) for p in inputs)
    before = len(list(output_dir.glob("*_stats.json")))
    stop = threading.Event()
    with stage_progress("download: img2dataset parts", total=total) as advance:

        def poll() -> None:
            shown = 0
            while not stop.wait(0.5):
                done = len(list(output_dir.glob("*_stats.json"))) - before
                advance(done - shown)
                shown = done

        watcher = threading.Thread(target=poll, daemon=True)
        watcher.start()
        try:
            yield
        finally:
            stop.set()
            watcher.join()


def scan_attempts(download_dir: Path) -> pl.LazyFrame:
    """img2dataset's per-row results, the latest attempt of each row only (retries add parts
    with higher numbers after the first run's)."""
    attempts = pl.scan_parquet(download_dir / "*.parquet", include_file_paths="download_parquet").select(
        "uid", "key", "status", "error_message", "width", "height", "original_width", "original_height", "sha256",
        "download_parquet",
    )
    if not _retry_dir(download_dir).exists():  # one attempt per row: nothing to collapse
        return attempts
    return attempts.sort("download_parquet", "uid").unique("uid", keep="last", maintain_order=True)


def _retry_dir(download_dir: Path) -> Path:
    """Where --retry-failed writes the rows it asks img2dataset for again."""
    return download_dir.parent / "download-retry"


def failure_reason(status: str, error_message: str | None) -> str:
    """A failed row's reason: the guard's or a transient network reason when the message names
    one (network:blocked_address, network:timeout, network:rate_limited...), else img2dataset's."""
    from cnclip.corpus.net.reasons import reason_from_error_message

    return reason_from_error_message(error_message) or f"download:{status}"


def with_failure_reasons(attempts: pl.LazyFrame) -> pl.LazyFrame:
    # A Python call per failed row only: failures are a minority, and the message rules live
    # in one place (guard_reasons).
    return attempts.with_columns(
        pl.when(pl.col("status") == "success")
        .then(pl.lit(None, pl.String))
        .otherwise(pl.struct("status", "error_message").map_elements(
            lambda r: failure_reason(r["status"], r["error_message"]), return_dtype=pl.String))
        .alias("reason")
    )


def _statuses(download_dir: Path) -> dict:
    if not any(download_dir.glob("*.parquet")):
        return {}
    rows = scan_attempts(download_dir).group_by("status").agg(pl.len()).sort("status").collect().rows()
    return dict(rows)


def run_download_stage(recipe: Recipe) -> dict:
    """img2dataset in incremental mode: after a crash it redoes only parts without their stats."""
    layout = BuildLayout.of(recipe)
    if not any(layout.text_accepted_dir.glob("*.parquet")):
        info("download: no rows to download")
        return {"by_status": {}, "retries": 0}
    write_download_input(layout)
    guard = _img2dataset(recipe)
    return {"by_status": _statuses(layout.download_dir), "retries": 0, "guard": guard}


def retry_failed(recipe: Recipe, previous: dict) -> dict:
    """Download again only the rows whose latest attempt failed for a transient reason
    (timeouts, 5xx, 429, DNS, refused connections); their new results are added as new parts."""
    from cnclip.corpus.net.reasons import TRANSIENT

    layout = BuildLayout.of(recipe)
    failed = with_failure_reasons(scan_attempts(layout.download_dir).filter(pl.col("status") != "success"))
    transient = failed.filter(pl.col("reason").is_in(sorted(TRANSIENT))).select("uid")
    retry_input = _retry_dir(layout.download_dir) / f"attempt-{previous.get('retries', 0) + 1}.parquet"
    rows = (
        pl.concat([pl.scan_parquet(p) for p in sorted(layout.text_accepted_dir.glob("*.parquet"))],
                  how="diagonal_relaxed")
        .join(transient, on="uid", how="semi")
        .select("url", "caption", "uid")
        .pipe(as_sent)
        .collect()
    )
    if rows.height == 0:
        info("download: no transient failures to retry")
        return previous
    write_parquet_atomic(rows, retry_input)
    info(f"download: retrying {rows.height} rows that failed for transient reasons")
    # 'extend' numbers the new parts after the existing ones, so they are the latest attempts.
    guard = _img2dataset(recipe, url_list=str(retry_input), incremental_mode="extend")
    return {"by_status": _statuses(layout.download_dir), "retries": previous.get("retries", 0) + 1,
            "retried": rows.height, "guard": guard}


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
        return (layout.download_dir, _retry_dir(layout.download_dir))

    def run(self, context: StageContext) -> dict:
        return run_download_stage(context.recipe)

    def report(self, summary: dict) -> str:
        return f"download: {sum(summary['by_status'].values())} attempted, by status: {summary['by_status']}"

    def rejects(self, layout: BuildLayout, engine: Engine, tables: dict[str, Table]) -> list[tuple[str, Table]]:
        accepted, attempts = tables["accepted"], tables["attempts"]
        if attempts is None:
            return [("download.parquet", engine.sql(_NOT_ATTEMPTED.format(unreported=""), accepted=accepted))]
        unreported = "LEFT ANTI JOIN attempts t ON a.uid = t.uid"
        query = f"{_NOT_ATTEMPTED.format(unreported=unreported)} UNION ALL {_FAILED}"
        return [("download.parquet", engine.sql(query, accepted=accepted, attempts=attempts))]
