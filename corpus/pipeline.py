"""The corpus build as a Python API: one function per stage, and `build` that runs them all."""

from __future__ import annotations

import time
from pathlib import Path

from .download import DownloadReport, run_download_stage
from .funnel import print_funnel, write_funnel
from .ingest import ingest
from .layout import BuildLayout
from .progress import info
from .recipe import Recipe, load_recipe
from .shard import ShardReport, run_shard_stage
from .text import TextReport, run_text_stage


def _recipe(recipe: Recipe | str | Path) -> Recipe:
    return recipe if isinstance(recipe, Recipe) else load_recipe(recipe)


def run_text(recipe: Recipe | str | Path) -> TextReport:
    """Ingest every source and run the text stage (normalize, filter, collapse, cap)."""
    recipe = _recipe(recipe)
    report = ingest(recipe)
    result = run_text_stage(recipe, report.parts)
    info(f"text: {result.accepted} rows accepted, {result.rejected} rejected")
    return result


def run_download(recipe: Recipe | str | Path) -> DownloadReport:
    """Download the rows the text stage accepted, with img2dataset."""
    recipe = _recipe(recipe)
    BuildLayout.of(recipe).text_accepted_dir.mkdir(parents=True, exist_ok=True)
    result = run_download_stage(recipe)
    info(f"download: {result.attempted} attempted, by status: {result.by_status}")
    return result


def run_shard(recipe: Recipe | str | Path, show_funnel: bool = True) -> dict:
    """Write the final shards and manifests; returns the funnel (also in <manifest_dir>/funnel.json)."""
    recipe = _recipe(recipe)
    result: ShardReport = run_shard_stage(recipe)
    info(f"shard: {result.samples} samples in {result.shards} shards")
    funnel = write_funnel(BuildLayout.of(recipe), recipe.name)
    if show_funnel:
        print_funnel(funnel)
    return funnel


def build(recipe: Recipe | str | Path, show_funnel: bool = True) -> dict:
    """Every stage in order; returns the funnel."""
    recipe = _recipe(recipe)
    started = time.monotonic()
    run_text(recipe)
    run_download(recipe)
    funnel = run_shard(recipe, show_funnel=show_funnel)
    info(f"build {recipe.name}: done in {time.monotonic() - started:.0f} s -> {recipe.output_dir}/shards, "
         f"{recipe.manifest_dir}")
    return funnel
