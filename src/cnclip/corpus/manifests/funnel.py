"""The build's accounting: every input row is in samples/ or rejected/, exactly once.

The funnel is computed from the manifests themselves (a join, not a tally kept on the side), so
a stage that lost or duplicated a row fails the build instead of publishing a wrong corpus.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import polars as pl
from rich.table import Table

from cnclip._common.atomic import write_json_atomic
from cnclip._common.console import console
from cnclip._common.errors import CnclipError
from cnclip.corpus.runtime import storage
from cnclip.corpus.runtime.engine import Engine, default_engine
from cnclip.corpus.runtime.layout import BuildLayout, at


class AccountingError(CnclipError, RuntimeError):
    """Samples and rejects do not add up to the input: a bug, never silently published."""


def _parts(folder: Path | str) -> list[Path] | list[str]:
    """The Parquet parts of a manifest folder: locally every part; on a URL the committed ones (a
    part without its marker never finished uploading; verify reports it)."""
    if storage.is_url(folder):
        from cnclip.corpus.runtime.commit import committed_parts

        return committed_parts(folder, ".parquet")
    return sorted(Path(folder).glob("*.parquet"))


def scan_manifest(folder: Path | str, columns: list[str]) -> pl.LazyFrame | None:
    parts = _parts(folder)
    return storage.scan_parquet(parts).select(columns) if parts else None


def tally(manifest_dir: Path | str, engine: Engine | None = None) -> tuple[int, dict[str, dict[str, int]], int]:
    """From the manifest parts on disk: samples, rejects by stage and reason, distinct uids."""
    engine = engine or default_engine()
    samples = engine.scan(_parts(at(manifest_dir, "samples")), {"uid": pl.Int64})
    rejected = engine.scan(_parts(at(manifest_dir, "rejected")), {"uid": pl.Int64, "stage": pl.String,
                                                               "reason": pl.String})
    sample_count = engine.rows(engine.sql("SELECT COUNT(*) FROM samples", samples=samples))[0][0]
    counts = engine.rows(engine.sql(
        "SELECT stage, reason, COUNT(*) FROM rejected GROUP BY stage, reason ORDER BY stage, reason",
        rejected=rejected))
    by_stage: dict[str, dict[str, int]] = {}
    for stage, reason, count in counts:
        by_stage.setdefault(stage, {})[reason] = count
    distinct = engine.rows(engine.sql(
        "SELECT COUNT(DISTINCT uid) FROM (SELECT uid FROM samples UNION ALL SELECT uid FROM rejected)",
        samples=samples, rejected=rejected))[0][0]
    return sample_count, by_stage, distinct


def _imbalance(manifest_dir: Path, input_rows: int, counts: tuple) -> str | None:
    sample_count, by_stage, distinct = counts
    rejected_count = sum(n for reasons in by_stage.values() for n in reasons.values())
    if sample_count + rejected_count != input_rows or distinct != input_rows:
        return (f"{manifest_dir}: {input_rows} input rows but {sample_count} samples + "
                f"{rejected_count} rejected ({distinct} distinct rows)")
    return None


def accounting_problem(manifest_dir: Path | str) -> str | None:
    """Whether the manifests on disk still add up to the input rows funnel.json counted."""
    try:
        input_rows = json.loads(storage.read_text(storage.join(manifest_dir, "funnel.json")))["input_rows"]
        return _imbalance(manifest_dir, input_rows, tally(manifest_dir))
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"{storage.join(manifest_dir, 'funnel.json')}: unreadable ({err})"
    except pl.exceptions.PolarsError as err:
        return f"{manifest_dir}: manifest parts unreadable ({str(err).splitlines()[0]})"


def compute_funnel(layout: BuildLayout, recipe_name: str, stages: Sequence[str] | None = None,
                   engine: Engine | None = None) -> dict:
    """The funnel, one row per stage of `stages` (default: the pipeline's stages shown in it)."""
    if stages is None:
        from cnclip.corpus.pipeline import funnel_stages

        stages = funnel_stages()
    report = json.loads(storage.read_text(at(layout.work, "ingest.state.json")))["summary"]
    input_rows = sum(report["rows_by_source"].values())
    counts = tally(layout.manifest_dir, engine)
    problem = _imbalance(layout.manifest_dir, input_rows, counts)
    if problem:
        raise AccountingError(problem)
    sample_count, by_stage, _ = counts
    by_reason: dict[str, int] = {}
    for reasons in by_stage.values():
        for reason, count in reasons.items():
            by_reason[reason] = by_reason.get(reason, 0) + count
    rejected_count = sum(by_reason.values())

    rows, remaining = [], input_rows
    for stage in stages:
        reasons = by_stage.get(stage, {})
        out = remaining - sum(reasons.values())
        rows.append({"stage": stage, "in": remaining, "out": out, "rejected": reasons})
        remaining = out
    # Rejections from stages not listed (e.g. a future stage) still count in the totals above.
    return {
        "name": recipe_name,
        # Absolute, so a trainer given only this manifest_dir finds the shards.
        "shards_dir": layout.shards_dir if layout.remote else str(layout.shards_dir.resolve()),
        "input_rows": input_rows,
        "rows_by_source": report["rows_by_source"],
        "file_errors": report["file_errors"],
        "source_reports": report.get("source_reports", {}),
        "stages": rows,
        "samples": sample_count,
        "rejected": rejected_count,
        "rejected_by_reason": by_reason,
    }


def write_funnel(layout: BuildLayout, recipe_name: str, stages: Sequence[str] | None = None,
                 engine: Engine | None = None) -> dict:
    funnel = compute_funnel(layout, recipe_name, stages, engine)
    if storage.is_url(layout.funnel_path):  # committed by its marker, like every published part
        from cnclip.corpus.runtime.commit import write_part

        write_part(layout.funnel_path, json.dumps(funnel, ensure_ascii=False, indent=2).encode("utf-8"))
    else:
        write_json_atomic(layout.funnel_path, funnel)
    return funnel


def funnel_table(funnel: dict) -> Table:
    table = Table(title=f"funnel: {funnel['name']} ({funnel['input_rows']} input rows)")
    table.add_column("stage")
    table.add_column("in", justify="right")
    table.add_column("out", justify="right")
    table.add_column("kept", justify="right")
    table.add_column("rejected by reason")
    for stage in funnel["stages"]:
        kept = f"{stage['out'] / stage['in']:.1%}" if stage["in"] else "-"
        reasons = ", ".join(
            f"{r.removeprefix(stage['stage'] + ':')} {n}"
            for r, n in sorted(stage["rejected"].items(), key=lambda x: -x[1])
        )
        table.add_row(stage["stage"], str(stage["in"]), str(stage["out"]), kept, reasons or "-")
    table.caption = f"{funnel['samples']} samples, {funnel['rejected']} rejected"
    return table


def print_funnel(funnel: dict) -> None:
    console.print(funnel_table(funnel))
