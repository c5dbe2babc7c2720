"""Download stage: img2dataset on the rows the text stage accepted.

img2dataset does the fetching, resizing and size/aspect checks; this module only maps the recipe
onto its Python API and adds the one guard it lacks: OpenCV is told the recipe's pixel limit, so
a decompression bomb is refused from its header before any pixel memory is allocated.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

import polars as pl

from .layout import BuildLayout
from .progress import info
from .recipe import Recipe, SampleWebSource


@contextlib.contextmanager
def serve_sample_webs(recipe: Recipe) -> Iterator[None]:
    """Start the built-in sample web of every `sample_web` source for the duration of a stage."""
    from .sample_web import SampleWebServer

    layout = BuildLayout.of(recipe)
    with contextlib.ExitStack() as stack:
        for source in recipe.sources:
            if isinstance(source, SampleWebSource):
                stack.enter_context(SampleWebServer(layout.sample_web_dir / source.name / "site", source.port))
        yield


def img2dataset_arguments(recipe: Recipe) -> dict:
    layout = BuildLayout.of(recipe)
    image, download = recipe.image, recipe.download
    return dict(
        url_list=str(layout.text_accepted_dir),
        input_format="parquet",
        url_col="url",
        caption_col="caption",
        save_additional_columns=["uid"],
        output_format="webdataset",
        output_folder=str(layout.download_dir),
        processes_count=download.processes,
        thread_count=download.threads,
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


def run_download_stage(recipe: Recipe) -> dict:
    """img2dataset in incremental mode: after a crash it redoes only parts without their stats."""
    layout = BuildLayout.of(recipe)
    out_dir = layout.download_dir
    accepted = sorted(layout.text_accepted_dir.glob("*.parquet"))
    if not accepted:
        info("download: no rows to download")
        return {"by_status": {}}
    # Spawned img2dataset workers inherit these. OpenCV checks its limit on the header.
    os.environ["OPENCV_IO_MAX_IMAGE_PIXELS"] = str(recipe.image.max_pixels)
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    from img2dataset import download

    with serve_sample_webs(recipe):
        download(**img2dataset_arguments(recipe))
    statuses = (
        pl.scan_parquet(out_dir / "*.parquet").group_by("status").agg(pl.len()).collect().rows()
        if any(out_dir.glob("*.parquet"))
        else []
    )
    return {"by_status": {status: count for status, count in sorted(statuses)}}
