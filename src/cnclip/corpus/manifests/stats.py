"""`cnclip corpus stats`: what a built corpus holds, computed from its manifests with polars."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
from rich.table import Table

from cnclip._common.console import stdout_console, warn
from cnclip._common.errors import CnclipError
from cnclip.corpus.manifests.funnel import funnel_table, scan_manifest
from cnclip.corpus.manifests.integrity import as_location, damaged_files, location_in
from cnclip.corpus.runtime import storage

_QUANTILES = [0.0, 0.1, 0.5, 0.9, 1.0]


def _distribution(frame: pl.LazyFrame, expr: pl.Expr) -> dict[str, float]:
    row = frame.select([expr.quantile(q, "nearest").alias(f"p{int(q * 100)}") for q in _QUANTILES]).collect()
    return {name: (None if value is None else float(value)) for name, value in row.row(0, named=True).items()}


class ManifestError(CnclipError, FileNotFoundError):
    """A folder given as a build's manifest_dir that holds no manifests."""


def corpus_stats(manifest_dir: str | Path) -> dict:
    """The figures of a built corpus, from a local manifest_dir or one published to a URL."""
    manifest_dir = as_location(manifest_dir)
    storage.require_folder(manifest_dir)
    samples = scan_manifest(location_in(manifest_dir, "samples"), ["source", "caption", "width", "height",
                                                             "original_width", "original_height"])
    rejected = scan_manifest(location_in(manifest_dir, "rejected"), ["reason"])
    if samples is None and rejected is None:
        raise ManifestError(f"{manifest_dir}: no samples/ or rejected/ manifests here")
    stats: dict = {"manifest_dir": str(manifest_dir)}
    funnel_path = location_in(manifest_dir, "funnel.json")
    if storage.exists(funnel_path):
        stats["funnel"] = json.loads(storage.read_text(funnel_path))
    if samples is not None:
        stats["samples"] = samples.select(pl.len()).collect().item()
        by_source = samples.group_by("source").agg(pl.len()).sort("source").collect()
        stats["samples_by_source"] = dict(by_source.rows())
        stats["caption_chars"] = _distribution(samples, pl.col("caption").str.len_chars())
        stats["unique_captions"] = samples.select(pl.col("caption").n_unique()).collect().item()
        stats["original_width"] = _distribution(samples, pl.col("original_width"))
        stats["original_height"] = _distribution(samples, pl.col("original_height"))
    if rejected is not None:
        reasons = rejected.group_by("reason").agg(pl.len()).sort("len", "reason", descending=[True, False]).collect()
        stats["rejected_by_reason"] = dict(reasons.rows())
    stats["problems"] = _disagreements(manifest_dir, stats)
    return stats


def _disagreements(manifest_dir: Path | str, stats: dict) -> list[str]:
    """Where funnel.json or checksums.json (what was built) and the disk (what is left) differ;
    cheap checks only (sizes, not hashes): `cnclip corpus verify` does the full one."""
    problems = []
    funnel = stats.get("funnel")
    if funnel is not None:
        on_disk = (stats.get("samples", 0), sum(stats.get("rejected_by_reason", {}).values()))
        if on_disk != (funnel.get("samples"), funnel.get("rejected")):
            problems.append(f"{manifest_dir}: funnel.json counts {funnel.get('samples')} samples and "
                            f"{funnel.get('rejected')} rejected; the manifests on disk hold {on_disk[0]} "
                            f"and {on_disk[1]}")
    try:
        damaged, _ = damaged_files(manifest_dir, full=False)
    except ValueError as err:
        damaged = [str(err)]
    problems += damaged
    if problems:
        problems.append(f"run `cnclip corpus verify {manifest_dir}` for a full check")
    return problems


def print_stats(stats: dict) -> None:
    """The tables on stdout (the command's result: `stats > file` keeps them); problems on stderr."""
    if "funnel" in stats:
        table = funnel_table(stats["funnel"])
        if stats.get("problems"):
            table.title += ", as built (funnel.json); the disk differs, see below"
        stdout_console.print(table)
    table = Table(title=f"corpus: {stats['manifest_dir']}")
    table.add_column("measure")
    table.add_column("value")
    table.add_row("samples", str(stats.get("samples", 0)))
    for source, count in stats.get("samples_by_source", {}).items():
        table.add_row(f"  from {source}", str(count))
    if "caption_chars" in stats:
        table.add_row("unique captions", str(stats["unique_captions"]))
        for name in ("caption_chars", "original_width", "original_height"):
            quantiles = "  ".join(f"{k} {v:g}" for k, v in stats[name].items() if v is not None)
            table.add_row(name.replace("_", " "), quantiles)
    for reason, count in stats.get("rejected_by_reason", {}).items():
        table.add_row(f"rejected {reason}", str(count))
    stdout_console.print(table)
    for problem in stats.get("problems", []):
        warn(problem)
