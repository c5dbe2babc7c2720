"""The corpus build as a Python API: the ordered list of stages, `build` that runs them all, and
one entry point per group of stages.

Every stage follows one contract (runtime/stage.py) and lives in its module under stages/;
STAGES below is the one list that build, resume (fingerprints chained through it), `clean`, the
funnel and the rejected/ manifests iterate. Adding a stage is its module and one entry here.

Stages are resumable (see state.py): rerunning a recipe after a crash skips completed stages,
resumes the interrupted one from its last whole part, and redoes any stage whose settings (or
whose upstream stage's outputs) changed. A finished shard stage is verified against its
checksums first and redone for whatever is missing or changed. `fresh=True` starts over.

Every entry point writes only into folders this recipe's build owns, one build at a time per
output_dir (see ownership.py), and builds the engine of the recipe's `engine:` block once
(unless handed one), with every stage's state computed once.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

from rich.markup import escape

from cnclip._common.console import info, warn
from cnclip._common.errors import CnclipError, disk_errors
from cnclip._common.mainguard import require_main_guard
from cnclip.corpus.manifests.funnel import print_funnel
from cnclip.corpus.recipe import SPARK_URL_WORK_DIR, Recipe, RecipeError, load_recipe
from cnclip.corpus.runtime import storage
from cnclip.corpus.runtime.engine import Engine, make_engine
from cnclip.corpus.runtime.fingerprints import input_listing as _file_listing  # noqa: F401 (kept importable here)
from cnclip.corpus.runtime.layout import BuildLayout
from cnclip.corpus.runtime.ownership import build_lock, has_marker, owned_build, remove_owned
from cnclip.corpus.runtime.publish import publish, publishes_remotely
from cnclip.corpus.runtime.published_ownership import check_published, claim_published, remove_published
from cnclip.corpus.runtime.stage import Stage, StageContext, applicable
from cnclip.corpus.runtime.stage import stage_states as _states_of
from cnclip.corpus.runtime.state import StageState
from cnclip.corpus.stages.dedup import DedupStage
from cnclip.corpus.stages.download import DownloadStage
from cnclip.corpus.stages.download import retry_failed as retry_transient_failures
from cnclip.corpus.stages.embed import EmbedStage
from cnclip.corpus.stages.hash import HashStage
from cnclip.corpus.stages.ingest import IngestStage
from cnclip.corpus.stages.shard import ShardStage
from cnclip.corpus.stages.text import TextStage
from cnclip.corpus.stages.translate import TranslateStage

# EmbedStage and TranslateStage apply only to recipes with their section (a build without one runs
# the rest).
STAGES: list[Stage] = [IngestStage(), TranslateStage(), TextStage(), DownloadStage(), HashStage(), DedupStage(),
                       EmbedStage(), ShardStage()]
# The stages every build runs; OPTIONAL_STAGE_NAMES run only for a recipe with their section.
STAGE_NAMES = tuple(stage.name for stage in STAGES if stage.only_with is None)
OPTIONAL_STAGE_NAMES = tuple(stage.name for stage in STAGES if stage.only_with is not None)


class StageOrderError(CnclipError, RuntimeError):
    """A stage asked for before the stage it needs has run."""


def _recipe(recipe: Recipe | str | Path) -> Recipe:
    return recipe if isinstance(recipe, Recipe) else load_recipe(recipe)


def funnel_stages() -> list[str]:
    """The stages the funnel has a row for, in pipeline order (of a build without optional sections;
    a build's own funnel lists the stages it ran)."""
    return [stage.name for stage in STAGES if stage.in_funnel and stage.only_with is None]


def stage_states(recipe: Recipe) -> dict[str, StageState]:
    """Each stage's record, fingerprinted by its settings and everything upstream of it."""
    return _states_of(recipe, STAGES)


def _context(recipe: Recipe, engine: Engine | None) -> StageContext:
    """One per build: the engine (the recipe's unless handed one) and every stage's state."""
    return StageContext(recipe, BuildLayout.of(recipe), engine or make_engine(recipe.engine),
                        applicable(recipe, STAGES), _states_of(recipe, STAGES))


@contextlib.contextmanager
def _owned(recipe: Recipe) -> Iterator[None]:
    """Refuse folders that are not this build's (writing nothing), then hold the build lock.

    An output folder the system will not let us create (a file in its path, no permission) is a
    one-line DiskError here, before any stage runs."""
    remote = publishes_remotely(recipe)
    if remote:
        check_published(recipe)
    layout = BuildLayout.of(recipe)
    # Work files on a URL: nothing local to own; the lock is the work_dir's lock object.
    owned = build_lock(layout.lock_root) if layout.remote else owned_build(layout, recipe.name)
    with disk_errors(), owned:
        if remote:
            claim_published(recipe)
        yield


def _run_stage(context: StageContext, stage: Stage) -> dict:
    state = context.states[stage.name]
    stage.prepare(context, state)
    if state.complete:
        info(f"{state.stage}: up to date, skipped")
        summary = state.summary
    else:
        with disk_errors():  # an unwritable output folder or a full disk: one line, not a traceback
            if state.begin():
                info(f"{state.stage}: resuming")
            summary = stage.run(context)
            state.finish(summary)
    line = stage.report(summary)
    if line:
        info(line)
    return summary


def _run_stages(context: StageContext, names: Sequence[str]) -> dict:
    """The named stages, in list order; returns the last one's summary."""
    summary: dict = {}
    for stage in context.stages:
        if stage.name in names:
            summary = _run_stage(context, stage)
    return summary


def run_text(recipe: Recipe | str | Path, engine: Engine | None = None) -> dict:
    """Ingest every source, translate those the recipe's `translate` section names, and run the text
    stage (normalize, filter, collapse, cap)."""
    recipe = _recipe(recipe)
    with _owned(recipe):
        return _run_stages(_context(recipe, engine), ("ingest", "translate", "text"))


def run_download(recipe: Recipe | str | Path, retry_failed: bool = False, engine: Engine | None = None) -> dict:
    """Download the rows the text stage accepted, with img2dataset behind the network guard.

    retry_failed: after a completed download, fetch again only the rows that failed for a
    transient reason; the stages after it are then brought up to date by the next build.
    """
    recipe = _recipe(recipe)
    require_main_guard("cnclip.corpus.run_download")
    with _owned(recipe):
        context = _context(recipe, engine)
        if not retry_failed:
            return _run_stages(context, ("download",))
        states = context.states
        if not states["download"].complete:
            raise StageOrderError(f"{recipe.name}: --retry-failed needs a completed download stage; run it first")
        summary = retry_transient_failures(recipe, states["download"].summary, context.engine)
        states["download"].finish(summary)
        # New parts to hash; dedup over everything again; shards planned afresh.
        states["hash"].reopen()
        states["dedup"].reopen()
        states["shard"].discard()
    info(DownloadStage().report(summary))
    return summary


def run_dedup(recipe: Recipe | str | Path, engine: Engine | None = None) -> dict:
    """pHash every downloaded image, then drop exact, near and (optionally) caption duplicates."""
    recipe = _recipe(recipe)
    with _owned(recipe):
        return _run_stages(_context(recipe, engine), ("hash", "dedup"))


def _publish(recipe: Recipe) -> None:
    """Where output_dir and manifest_dir are URLs: upload what the shard stage wrote under work_dir
    (only what is missing or changed there), checksums.json last."""
    if publishes_remotely(recipe) and not BuildLayout.of(recipe).remote:  # else written in place
        summary = publish(recipe)
        info(f"publish: {summary['uploaded']} file(s) uploaded, {summary['unchanged']} unchanged -> "
             f"{summary['shards_dir']}, {summary['manifest_dir']}")


def run_shard(recipe: Recipe | str | Path, show_funnel: bool = True, engine: Engine | None = None) -> dict:
    """Write the final shards and manifests; returns the funnel (also in <manifest_dir>/funnel.json)."""
    recipe = _recipe(recipe)
    with _owned(recipe):
        funnel = _run_stages(_context(recipe, engine), ("shard",))
        _publish(recipe)
    if show_funnel:
        print_funnel(funnel)
    return funnel


def _remove_stage_outputs(recipe: Recipe) -> None:
    """Every stage's outputs and record, last stage first, where they lie inside the build's own
    folders (a declared output elsewhere is never touched)."""
    layout = BuildLayout.of(recipe)
    if layout.remote:  # every output lies under the URL folders the markers claim
        for stage in reversed(STAGES):
            state = StageState(layout.work, stage.name, "", tuple(stage.outputs(layout)))
            for output in state.outputs:
                storage.remove(output)
            state.discard()
        return
    roots = [layout.output_dir.resolve(), layout.manifest_dir.resolve()]
    # The report the build writes after its stages (not a stage's output: no stage reads it).
    if layout.report_path.is_symlink() or layout.report_path.is_file():
        layout.report_path.unlink()
    for stage in reversed(STAGES):
        state = StageState(layout.work, stage.name, "", tuple(stage.outputs(layout)))
        for output in state.outputs:
            where = output.resolve()
            if not any(root == where or root in where.parents for root in roots):
                continue
            if output.is_dir() and not output.is_symlink():
                shutil.rmtree(output)
            elif output.exists() or output.is_symlink():
                output.unlink()
        state.discard()


def clean(recipe: Recipe | str | Path) -> None:
    """Remove what a recipe's build created (every stage's outputs, then what its markers record:
    work files, shards, manifests) and nothing else; files of the user's beside them are left alone."""
    recipe = _recipe(recipe)
    layout = BuildLayout.of(recipe)
    local = not layout.remote and has_marker(layout)  # otherwise nothing local was made by a build
    lock = build_lock(layout.lock_root) if local or layout.remote else contextlib.nullcontext()
    with lock:
        if publishes_remotely(recipe):
            remove_published(recipe)
        if local:
            remove_owned(layout, recipe.name, forget=False)  # refuses another recipe's folders first
            _remove_stage_outputs(recipe)
            remove_owned(layout, recipe.name, forget=True)


def _write_report(recipe: Recipe, layout: BuildLayout) -> Path | None:
    """The corpus report beside the local manifests (None where the build wrote them to a URL)."""
    if layout.remote:
        return None
    from cnclip.report.corpus import write_corpus_report

    try:
        return write_corpus_report(layout.manifest_dir, layout.report_path, settings=recipe.model_dump(mode="json"),
                                   shards_dir=layout.shards_dir, work_dir=layout.work)
    except CnclipError as err:  # the corpus is built and intact: a report it cannot write is no reason to fail
        warn(f"report not written: {err}")
        return None


def _session_engine(engine: Engine | None, spark: Any) -> Engine | None:
    """An existing SparkSession handed to the API becomes the build's engine (its master and
    conf are the session's own; the recipe's engine block is not read)."""
    if spark is None:
        return engine
    if engine is not None:
        raise ValueError("build: pass engine= or spark=, not both")
    from cnclip.corpus.runtime.spark_engine import SparkEngine

    return SparkEngine(spark)


def build(recipe: Recipe | str | Path, show_funnel: bool = True, fresh: bool = False,
          engine: Engine | None = None, spark: Any = None) -> dict:
    """Every stage of STAGES in order (resuming an interrupted build) on one engine (the recipe's
    `engine:` block unless one is given, or `spark`, a running SparkSession); returns the funnel."""
    recipe = _recipe(recipe)
    require_main_guard("cnclip.corpus.build")  # refuse before any work: the download stage spawns workers
    # Built before any folder is claimed: an engine that cannot start (no pyspark) writes nothing.
    engine = _session_engine(engine, spark) or make_engine(recipe.engine)
    if engine.kind == "spark" and recipe.work_dir is not None and storage.is_url(recipe.work_dir):
        # the recipe checks its own engine block; a session or engine handed in is checked here
        raise RecipeError(f"build: {SPARK_URL_WORK_DIR}")
    with _owned(recipe):
        if fresh:
            if BuildLayout.of(recipe).remote:
                remove_published(recipe, forget=False)
            else:
                remove_owned(BuildLayout.of(recipe), recipe.name)
            _remove_stage_outputs(recipe)
        started = time.monotonic()
        context = _context(recipe, engine)
        for stage in context.stages:
            _run_stage(context, stage)
        _publish(recipe)
        funnel = json.loads(storage.read_text(context.layout.funnel_path))
        report = _write_report(recipe, context.layout)
    if show_funnel:
        print_funnel(funnel)
    info(_build_summary(recipe, time.monotonic() - started, report))
    return funnel


def _build_summary(recipe: Recipe, seconds: float, report: Path | None = None) -> str:
    """Where the build's results and its libraries' log are: the lines a build ends with (whole
    paths, one a line, so each can be copied)."""
    from cnclip.corpus.stages.download import download_log

    rows = [("shards", storage.join(str(recipe.output_dir), "shards")), ("manifests", recipe.manifest_dir)]
    log = download_log(BuildLayout.of(recipe))
    if log is not None and log.exists():
        rows.append(("img2dataset's output", log))
    if report is not None:
        rows.append(("report", report))
    width = max(len(label) for label, _ in rows)
    return "\n".join([f"build {recipe.name}: done in {seconds:.0f} s"] +
                     [f"  {label:<{width}}  {escape(str(path))}" for label, path in rows])
