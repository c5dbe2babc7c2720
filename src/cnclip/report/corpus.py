"""`cnclip corpus report`: one HTML page about a built corpus (page.py's style): the funnel,
the sources, distributions, sample thumbnails, examples of every reject reason and the settings.

Numbers come from funnel.json (the build's own accounting) and polars aggregations over the
manifests; images from the shards and, for duplicates, from the download's tars under work/
while the build's work folder exists.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import polars as pl

from cnclip._common.errors import CnclipError
from cnclip._common.records import read_record
from cnclip.report import charts, corpus_data
from cnclip.report.images import download_images, image_tag, images_by_key
from cnclip.report.page import Section, esc, figures, note, number, settings_block, table, write_page

REPORT_NAME = "report.html"
_STAGE_COLOURS = {"ingest": "#8c8c8c", "text": "#3b6ea5", "download": "#d9822b", "network": "#d9822b",
                  "politeness": "#d9822b", "dedup": "#b34747"}


class ReportError(CnclipError, FileNotFoundError):
    """A folder given to `corpus report` that is not a built corpus's manifest_dir."""


def _funnel(manifest_dir: Path) -> dict:
    return read_record(manifest_dir / "funnel.json", lambda p: p.read_text(encoding="utf-8"), ReportError,
                       "no funnel.json: not a built corpus (run `cnclip corpus build` first)", "stages", list,
                       "a build's funnel")


def funnel_section(funnel: dict) -> Section:
    """Rows in and out of every stage and rejects by reason: the numbers are funnel.json's."""
    stages = funnel.get("stages", [])
    labels = ["input rows"] + [f"after {s['stage']}" for s in stages]
    values = [funnel.get("input_rows", 0)] + [s["out"] for s in stages]
    reasons = sorted(funnel.get("rejected_by_reason", {}).items(), key=lambda kv: (-kv[1], kv[0]))
    charts_ = [charts.horizontal_bars(labels, values, "rows after each stage")]
    if reasons:
        colours = [_STAGE_COLOURS.get(r.split(":")[0], "#7d5ba6") for r, _ in reasons]
        charts_.append(charts.horizontal_bars([r for r, _ in reasons], [n for _, n in reasons],
                                              "rejected rows by reason", colours))
    rows = []
    for stage in stages:
        rows.append(f'<tr data-stage="{esc(stage["stage"])}"><td>{esc(stage["stage"])}</td>'
                    f'<td class="num" data-in>{number(stage["in"])}</td><td class="num" data-out>'
                    f'{number(stage["out"])}</td><td class="num">{number(stage["in"] - stage["out"])}</td>'
                    '<td></td></tr>')
        for reason, count in sorted(stage.get("rejected", {}).items()):
            rows.append(f'<tr data-reason="{esc(reason)}"><td></td><td></td><td></td>'
                        f'<td class="num" data-count>{number(count)}</td><td>{esc(reason)}</td></tr>')
    totals = (f'<p>input rows <b data-total="input_rows">{number(funnel.get("input_rows"))}</b> = samples '
              f'<b data-total="samples">{number(funnel.get("samples"))}</b> + rejected '
              f'<b data-total="rejected">{number(funnel.get("rejected"))}</b></p>')
    head = '<thead><tr><th>stage</th><th class="num">in</th><th class="num">out</th><th class="num">rejected</th>' \
           '<th>reason</th></tr></thead>'
    section = Section("funnel", "Funnel").add(totals, figures(charts_),
                                             f'<table id="funnel-table">{head}<tbody>{"".join(rows)}</tbody></table>')
    if funnel.get("file_errors"):
        section.add("<h3>input files that could not be read</h3>",
                    table(["problem"], [[e] for e in funnel["file_errors"]]))
    return section


def sources_section(funnel: dict, samples, rejected) -> Section:
    rows = corpus_data.source_table(funnel, samples, rejected)
    return Section("sources", "Sources").add(table(["source", "input rows", "samples", "rejected", "commonest reasons"],
                                                   rows, numeric=(1, 2, 3), attrs='id="sources-table"'))


def distributions_section(manifest_dir: Path, samples) -> Section:
    section = Section("distributions", "Distributions")
    if samples is None:
        return section.add(note("no samples: nothing to measure"))
    measures = [
        ("caption length", "characters", pl.col("caption").str.len_chars(), True),
        ("original width", "pixels", pl.col("original_width"), True),
        ("original height", "pixels", pl.col("original_height"), True),
        ("stored width", "pixels", pl.col("width"), True),
        ("stored height", "pixels", pl.col("height"), True),
        ("aspect ratio (original)", "width / height",
         (pl.col("original_width") / pl.col("original_height")).clip(0.1, 10), False),
    ]
    svgs = []
    for title, unit, expr, integer in measures:
        binned = corpus_data.histogram(samples, expr, integer=integer)
        if binned is not None:
            svgs.append(charts.histogram(*binned, title, unit))
    scores = corpus_data.clip_scores(manifest_dir, samples)
    binned = corpus_data.histogram(scores, pl.col("clip_score")) if scores is not None else None
    if binned is not None:
        svgs.append(charts.histogram(*binned, "CLIP score", "cosine(image, caption)"))
    section.add(figures(svgs))
    if binned is None:
        section.add(note("no CLIP scores in this corpus (a recipe's embed section computes them)"))
    return section


def thumbnails_section(samples, shards_dir: Path | None) -> Section:
    section = Section("samples", "Samples")
    shards = sorted(int(p.stem) for p in Path(shards_dir).glob("[0-9]*.tar") if p.stem.isdigit()) \
        if shards_dir and Path(shards_dir).is_dir() else []
    rows = corpus_data.thumbnail_rows(samples, shards)
    if rows.height == 0:
        return section.add(note(f"no shard found in {shards_dir}: no thumbnails"))
    found = images_by_key(shards_dir, rows["key"].to_list())
    tiles = []
    for key, caption in rows.select("key", "caption").iter_rows():
        image = image_tag(found.get(key), caption, "image not found in its shard", data_key=key)
        tiles.append(f'<div class="tile" data-key="{esc(key)}">{image}<div class="key">{esc(key)}</div>'
                     f'<div>{esc(caption)}</div></div>')
    total = samples.select(pl.len()).collect().item()
    section.add(note(f"{rows.height} of {total:,} samples, spread evenly over the shards in {shards_dir}"))
    return section.add(f'<div class="grid">{"".join(tiles)}</div>')


def _example_html(row: dict, kept: dict, own: dict[int, tuple], work_note: str | None) -> str:
    """One reject: its caption (raw -> normalized), why, and for a duplicate both images."""
    reason = row["reason"]
    text = (f'<div><span>{esc(row["caption_raw"])}</span> <span class="arrow">→</span> '
            f'<span>{esc(row["caption"])}</span></div>')
    why = f'<div class="note">uid {row["uid"]} · {esc(row["source"])} · {esc(row["url"])}' + \
          (f' · {esc(row["detail"])}' if row["detail"] else "") + "</div>"
    if reason not in corpus_data.DUPLICATE_REASONS:
        return f'<div class="example" data-example="{esc(reason)}">{text}{why}</div>'
    mine = image_tag(own.get(row["uid"]), "duplicate", work_note or "image not in work/download/")
    other = row["duplicate_of"]
    if reason == "dedup:eval_overlap":
        theirs = f'<div class="gone">evaluation image {esc(other)}</div>'
    else:
        theirs = image_tag(kept.get(other), "kept", "the kept row is not a sample" if other is None
                           else "kept image not in its shard")
    pair = (f'<div class="pair"><div class="tile">{mine}<div>this row (uid {row["uid"]})</div></div>'
            f'<div class="tile">{theirs}<div>duplicates {esc(other or row["duplicate_of_uid"])}</div></div></div>')
    return f'<div class="example" data-example="{esc(reason)}">{pair}{text}{why}</div>'


def examples_section(rejected, shards_dir: Path | None, work_dir: Path | None) -> Section:
    section = Section("rejects", "Rejected rows: examples of every reason")
    rows = corpus_data.examples(rejected)
    if rows.height == 0:
        return section.add(note("no row was rejected"))
    dups = rows.filter(pl.col("reason").is_in(corpus_data.DUPLICATE_REASONS))
    kept = images_by_key(shards_dir, [k for k in dups["duplicate_of"].to_list() if k]) if shards_dir else {}
    attempts = corpus_data.attempts_of(work_dir, dups["uid"].to_list())
    own = download_images(Path(work_dir) / "download", attempts.iter_rows()) if attempts is not None else {}
    work_note = None if attempts is not None else \
        f"the build's work folder is gone ({work_dir}): the duplicate's own image is no longer kept"
    for reason, group in rows.group_by("reason", maintain_order=True):
        items = "".join(_example_html(r, kept, own, work_note) for r in group.iter_rows(named=True))
        section.add(f'<h3 data-reason="{esc(reason[0])}">{esc(reason[0])}</h3>', items)
    return section


def settings_section(funnel: dict, manifest_dir: Path, settings: dict | None) -> Section:
    section = Section("settings", "Build settings")
    marker = manifest_dir / ".cnclip-build.json"
    if settings is None:
        name = funnel.get("name")
        if marker.is_file():
            name = json.loads(marker.read_text(encoding="utf-8")).get("recipe", name)
        section.add(note(f"recipe {name!r}: its settings are shown when the report is written by the build "
                         "(or given --recipe)"))
    else:
        section.add(settings_block(settings))
    model = manifest_dir / "embeddings" / "model.json"
    if model.is_file():
        section.add("<h3>embedding model</h3>", settings_block(json.loads(model.read_text(encoding="utf-8"))))
    return section


def default_work_dir(funnel: dict) -> Path | None:
    """work/ beside the shards (output_dir/work), where a local build keeps it."""
    shards = funnel.get("shards_dir")
    return Path(shards).parent / "work" if shards and "://" not in shards else None


def write_corpus_report(manifest_dir: str | Path, out: str | Path | None = None, settings: dict[str, Any] | None = None,
                        shards_dir: str | Path | None = None, work_dir: str | Path | None = None) -> Path:
    """Write the report of the corpus in `manifest_dir` (default: MANIFEST_DIR/report.html)."""
    manifest_dir = Path(manifest_dir)
    if "://" in str(manifest_dir):
        raise ReportError(f"{manifest_dir}: corpus report reads a local manifest_dir (copy it here first)")
    if not manifest_dir.is_dir():
        raise ReportError(f"{manifest_dir}: no such folder")
    funnel = _funnel(manifest_dir)
    samples, rejected = corpus_data.scan(manifest_dir, "samples"), corpus_data.scan(manifest_dir, "rejected")
    shards = Path(shards_dir) if shards_dir else (Path(funnel["shards_dir"]) if funnel.get("shards_dir") else None)
    work = Path(work_dir) if work_dir else default_work_dir(funnel)
    try:
        sections = [funnel_section(funnel), sources_section(funnel, samples, rejected),
                    distributions_section(manifest_dir, samples), thumbnails_section(samples, shards),
                    examples_section(rejected, shards, work), settings_section(funnel, manifest_dir, settings)]
    except (pl.exceptions.PolarsError, OSError) as err:  # a truncated or foreign part: `corpus verify` says which
        raise ReportError(f"{manifest_dir}: manifest parts unreadable ({str(err).splitlines()[0]}); "
                          f"run `cnclip corpus verify {manifest_dir}`") from None
    subtitle = (f"{funnel.get('samples', 0):,} samples, {funnel.get('rejected', 0):,} rejected of "
                f"{funnel.get('input_rows', 0):,} input rows · {manifest_dir}")
    return write_page(Path(out) if out else manifest_dir / REPORT_NAME, f"corpus {funnel.get('name', '')}", subtitle,
                      sections)
