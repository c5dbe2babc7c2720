"""The corpus build as a Python API: one function per stage, and `build` that runs them all.

Stages are resumable (see state.py): rerunning a recipe after a crash skips completed stages,
resumes the interrupted one from its last whole part, and redoes any stage whose settings (or
whose upstream stage's outputs) changed. A finished shard stage is verified against its
checksums first and redone for whatever is missing or changed. `fresh=True` starts over.

Every entry point writes only into folders this recipe's build owns, one build at a time per
output_dir (see ownership.py).
"""

from __future__ import annotations

import contextlib
import glob
import time
from pathlib import Path
from typing import Callable, Iterator

import polars as pl

from cnclip._common.errors import CnclipError, disk_errors
from cnclip._common.mainguard import require_main_guard

from cnclip.corpus.stages.download import retry_failed as retry_transient_failures
from cnclip.corpus.stages.download import run_download_stage
from cnclip.corpus.manifests.funnel import print_funnel
from cnclip.corpus.stages.hash import run_hash_stage
from cnclip.corpus.stages.dedup import run_dedup_stage
from cnclip.corpus.stages.ingest import ingest
from cnclip.corpus.manifests.integrity import damaged_files, read_checksums, unexpected_files
from cnclip.corpus.runtime.layout import BuildLayout
from cnclip.corpus.runtime.ownership import build_lock, has_marker, owned_build, remove_owned
from cnclip._common.console import info, warn
from cnclip.corpus.recipe import Recipe, load_recipe
from cnclip.corpus.stages.shard import run_shard_stage, scan_accepted
from cnclip.corpus.sources import source_inputs
from cnclip.corpus.runtime.state import StageState, fingerprint, write_parquet_atomic
from cnclip.corpus.stages.text import run_text_stage

STAGES = ("ingest", "text", "download", "hash", "dedup", "shard")
HASH_VERSION = "phash-draft-v1"  # bump when hash values change, so hash parts are recomputed


class StageOrderError(CnclipError, RuntimeError):
    """A stage asked for before the stage it needs has run."""


def _recipe(recipe: Recipe | str | Path) -> Recipe:
    return recipe if isinstance(recipe, Recipe) else load_recipe(recipe)


def _file_listing(paths: list[str]) -> list:
    listing = []
    for path in paths:
        local = Path(path)
        stat = local.stat() if local.exists() else None
        listing.append([path, stat.st_size if stat else None, stat.st_mtime_ns if stat else None])
    return listing


def _eval_listing(paths: list[str]) -> list:
    """Each evaluation set with every file it reads (a folder's files, recursively; a glob's
    matches): the folder's or the pattern's own stat misses an image rewritten inside it."""
    listing = []
    for path in paths:
        if Path(path).is_dir():
            files = sorted(str(p) for p in Path(path).rglob("*") if p.is_file())
        else:
            files = sorted(glob.glob(path)) if glob.has_magic(path) else [path]
        listing.append([path, _file_listing(files)])
    return listing


def stage_states(recipe: Recipe) -> dict[str, StageState]:
    """Each stage's record, fingerprinted by its settings and everything upstream of it."""
    layout = BuildLayout.of(recipe)
    inputs = [_file_listing(source_inputs(s)) for s in recipe.sources]
    blacklist = _file_listing([recipe.text.blacklist]) if recipe.text.blacklist else None
    evals = _eval_listing(recipe.dedup.eval_images)
    prints: dict[str, str] = {}
    prints["ingest"] = fingerprint("ingest", recipe.settings("sources"), recipe.settings("crawl"), inputs)
    # Whether file:// URLs pass the text stage depends on download.allow_local_files being set.
    local_files = ["allow_local_files"] if recipe.download.allow_local_files else []
    prints["text"] = fingerprint(prints["ingest"], recipe.settings("text"), blacklist, *local_files)
    prints["download"] = fingerprint(prints["text"], recipe.settings("image"), recipe.settings("download"))
    prints["hash"] = fingerprint(prints["download"], HASH_VERSION)
    prints["dedup"] = fingerprint(prints["hash"], recipe.settings("dedup"), evals)
    prints["shard"] = fingerprint(prints["dedup"], recipe.settings("shard"), str(recipe.manifest_dir))
    outputs = {
        "ingest": (layout.ingest_dir, layout.work / "crawl"),
        "text": (layout.text_dir,),
        "download": (layout.download_dir, layout.download_input_dir),
        "hash": (layout.hash_dir,),
        "dedup": (layout.dedup_decisions.parent,),
        "shard": (layout.shards_dir, layout.samples_dir, layout.rejected_dir, layout.funnel_path,
                  layout.checksums_path, layout.shard_plan.parent),
    }
    return {stage: StageState(layout.work, stage, prints[stage], outputs[stage]) for stage in STAGES}


@contextlib.contextmanager
def _owned(recipe: Recipe) -> Iterator[None]:
    """Refuse folders that are not this build's (writing nothing), then hold the build lock.

    An output folder the system will not let us create (a file in its path, no permission) is a
    one-line DiskError here, before any stage runs."""
    with disk_errors(), owned_build(BuildLayout.of(recipe), recipe.name):
        yield


def _run_stage(state: StageState, run: Callable[[], dict]) -> dict:
    if state.complete:
        info(f"{state.stage}: up to date, skipped")
        return state.summary
    with disk_errors():  # an unwritable output folder or a full disk: one line, not a traceback
        if state.begin():
            info(f"{state.stage}: resuming")
        summary = run()
        state.finish(summary)
    return summary


def run_text(recipe: Recipe | str | Path) -> dict:
    """Ingest every source and run the text stage (normalize, filter, collapse, cap)."""
    recipe = _recipe(recipe)
    with _owned(recipe):
        states = stage_states(recipe)
        _run_stage(states["ingest"], lambda: ingest(recipe))
        summary = _run_stage(states["text"], lambda: run_text_stage(recipe))
    info(f"text: {summary['accepted']} rows accepted, {summary['rejected']} rejected")
    return summary


def run_download(recipe: Recipe | str | Path, retry_failed: bool = False) -> dict:
    """Download the rows the text stage accepted, with img2dataset behind the network guard.

    retry_failed: after a completed download, fetch again only the rows that failed for a
    transient reason; the stages after it are then brought up to date by the next build.
    """
    recipe = _recipe(recipe)
    require_main_guard("cnclip.corpus.run_download")
    with _owned(recipe):
        states = stage_states(recipe)
        if retry_failed:
            if not states["download"].complete:
                raise StageOrderError(f"{recipe.name}: --retry-failed needs a completed download stage; run it first")
            summary = retry_transient_failures(recipe, states["download"].summary)
            states["download"].finish(summary)
            # New parts to hash; dedup over everything again; shards planned afresh.
            states["hash"].reopen()
            states["dedup"].reopen()
            states["shard"].discard()
        else:
            summary = _run_stage(states["download"], lambda: run_download_stage(recipe))
    info(f"download: {sum(summary['by_status'].values())} attempted, by status: {summary['by_status']}")
    return summary


def run_dedup(recipe: Recipe | str | Path) -> dict:
    """pHash every downloaded image, then drop exact, near and (optionally) caption duplicates."""
    recipe = _recipe(recipe)
    layout = BuildLayout.of(recipe)
    with _owned(recipe):
        states = stage_states(recipe)
        _run_stage(states["hash"], lambda: run_hash_stage(layout.download_dir, layout.hash_dir,
                                                          recipe.dedup.processes))
        summary = _run_stage(states["dedup"], lambda: run_dedup_stage(recipe))
    info(f"dedup: dropped {summary['dropped'] or 'nothing'}")
    return summary


def run_shard(recipe: Recipe | str | Path, show_funnel: bool = True) -> dict:
    """Write the final shards and manifests; returns the funnel (also in <manifest_dir>/funnel.json)."""
    recipe = _recipe(recipe)
    with _owned(recipe):
        state = stage_states(recipe)["shard"]
        _reopen_if_damaged(BuildLayout.of(recipe), state)
        funnel = _run_stage(state, lambda: run_shard_stage(recipe))
    if show_funnel:
        print_funnel(funnel)
    return funnel


def _reopen_if_damaged(layout: BuildLayout, state: StageState) -> None:
    """Before a finished shard stage is called up to date: a published file that is missing or
    changed is removed and the stage resumed, which rewrites just those (and the small files
    written at its end); without a checksums record the stage is redone."""
    if not state.complete:
        return
    try:
        record = read_checksums(layout.manifest_dir)
        recorded = record["files"]
        problems, damaged = damaged_files(layout.manifest_dir, layout.shards_dir, record=record)
    except ValueError as err:
        warn(f"{err}; redoing the shard stage")
        state.discard()
        return
    for problem in unexpected_files(layout.manifest_dir, layout.shards_dir, recorded):
        warn(f"{problem}; remove it: readers would take it for part of the corpus")
    if problems:
        for problem in problems:
            warn(problem)
        info(f"shard: rewriting {len(damaged)} damaged file(s)")
        for path in damaged:
            path.unlink(missing_ok=True)
        state.reopen()


def clean(recipe: Recipe | str | Path) -> None:
    """Remove what a recipe's build created (work files, shards, manifests: what its markers
    record) and nothing else; files of the user's beside them are left alone."""
    recipe = _recipe(recipe)
    layout = BuildLayout.of(recipe)
    if not has_marker(layout):
        return  # nothing here was made by a build
    with build_lock(recipe.output_dir):
        remove_owned(layout, recipe.name, forget=True)


def build(recipe: Recipe | str | Path, show_funnel: bool = True, fresh: bool = False) -> dict:
    """Every stage in order (resuming an interrupted build); returns the funnel."""
    recipe = _recipe(recipe)
    require_main_guard("cnclip.corpus.build")  # refuse before any work: the download stage spawns workers
    with _owned(recipe):
        if fresh:
            remove_owned(BuildLayout.of(recipe), recipe.name)
        started = time.monotonic()
        run_text(recipe)
        run_download(recipe)
        run_dedup(recipe)
        funnel = run_shard(recipe, show_funnel=show_funnel)
    info(f"build {recipe.name}: done in {time.monotonic() - started:.0f} s -> {recipe.output_dir}/shards, "
         f"{recipe.manifest_dir}")
    return funnel

