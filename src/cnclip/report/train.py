"""`cnclip train report`: one HTML page about a training run (page.py's style): loss, learning
rate, logit scale and retrieval curves over samples seen across both stages (the stage switch
marked), throughput and the share of time spent waiting for data, the resolved config and the
package versions the run recorded.

It reads only what the run wrote: `log.jsonl` (one record per logging window, evaluation,
checkpoint and stage switch) and `run.json` (the resolved config, and `versions` when the run
recorded them).
"""

from __future__ import annotations

import json
from pathlib import Path

from cnclip._common.errors import CnclipError
from cnclip.report import charts
from cnclip.report.page import Section, figures, note, settings_block, table, write_page

REPORT_NAME = "report.html"


class RunReportError(CnclipError, FileNotFoundError):
    """A folder given to `train report` that holds no run log."""


def read_records(run_dir: Path) -> list[dict]:
    """The run's log records; a line cut short by a crash is skipped, not fatal."""
    path = run_dir / "log.jsonl"
    if not path.is_file():
        raise RunReportError(f"{path}: no run log here (a run's output_dir holds log.jsonl)")
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def read_run_record(run_dir: Path) -> dict:
    try:
        record = json.loads((run_dir / "run.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def samples_axis(records: list[dict]) -> dict[int, tuple[float, float]]:
    """Per stage: (samples seen at its step 0, samples per step), from its train records, so an
    evaluation logged by stage and step lands on the same x-axis as the training curves."""
    axis: dict[int, tuple[float, float]] = {}
    carried = 0.0
    for stage in sorted({r.get("stage") for r in records if isinstance(r.get("stage"), int)}):
        points = [(r["step"], r["samples"]) for r in records
                  if r.get("event") == "train" and r.get("stage") == stage and "samples" in r]
        if len(points) >= 2 and points[-1][0] != points[0][0]:
            per_step = (points[-1][1] - points[0][1]) / (points[-1][0] - points[0][0])
        elif points and points[0][0]:
            per_step = (points[0][1] - carried) / points[0][0]
        else:
            per_step = 0.0
        start = points[0][1] - points[0][0] * per_step if points else carried
        axis[stage] = (start, per_step)
        carried = points[-1][1] if points else start
    return axis


def x_of(record: dict, axis: dict[int, tuple[float, float]]) -> float:
    if "samples" in record:
        return float(record["samples"])
    start, per_step = axis.get(record.get("stage"), (0.0, 0.0))
    return start + record.get("step", 0) * per_step


def _by_stage(train: list[dict], key: str, axis, scale: float = 1.0,
              positive: bool = False) -> dict[str, tuple[list, list]]:
    """One series per stage (a stage's own schedule restarts, so its line does not join the last);
    `positive` drops values a log axis cannot show (a schedule's final lr of 0)."""
    series: dict[str, tuple[list, list]] = {}
    for record in train:
        value = record.get(key)
        if not isinstance(value, (int, float)) or (positive and value <= 0):
            continue
        xs, ys = series.setdefault(f"stage {record['stage']}", ([], []))
        xs.append(x_of(record, axis))
        ys.append(record[key] * scale)
    return series


def stage_marks(records: list[dict], axis) -> list[tuple[float, str]]:
    """Where each stage after the first starts, in samples seen."""
    stages = sorted(axis)
    return [(axis[s][0], f"stage {s}") for s in stages[1:]]


def curves_section(records: list[dict], axis) -> Section:
    train = [r for r in records if r.get("event") == "train"]
    section = Section("training", "Training")
    if not train:
        return section.add(note("no training window was logged yet"))
    marks = stage_marks(records, axis)
    plots = [
        charts.curves(_by_stage(train, "loss", axis), "contrastive loss", "loss", marks),
        charts.curves(_by_stage(train, "lr", axis, positive=True), "learning rate", "lr", marks, log_y=True),
        charts.curves(_by_stage(train, "logit_scale", axis), "logit scale (1 / temperature)", "scale", marks),
    ]
    if any("samples_per_s" in r for r in train):
        plots.append(charts.curves(_by_stage(train, "samples_per_s", axis), "throughput", "samples / s", marks))
    if any("data_wait" in r for r in train):
        plots.append(charts.curves(_by_stage(train, "data_wait", axis, 100.0), "time waiting for data",
                                   "% of the window", marks))
    section.add(figures(plots))
    rows = []
    for stage in sorted({r["stage"] for r in train}):
        mine = [r for r in train if r["stage"] == stage]
        rows.append((stage, mine[-1]["step"], int(x_of(mine[-1], axis)), mine[-1]["loss"],
                     mine[-1].get("logit_scale"), sum(r.get("samples_per_s", 0) for r in mine) / len(mine),
                     100 * sum(r.get("data_wait", 0) for r in mine) / len(mine)))
    return section.add(table(["stage", "last step", "samples seen", "last loss", "logit scale", "samples/s (mean)",
                              "data wait % (mean)"], rows, numeric=(1, 2, 3, 4, 5, 6), attrs='id="stages-table"'))


def eval_section(records: list[dict], axis) -> Section:
    evals = [r for r in records if r.get("event") == "eval"]
    section = Section("evaluation", "Evaluation")
    if not evals:
        return section.add(note("no evaluation was logged"))
    marks = stage_marks(records, axis)
    plots, last, columns = [], [], []
    for name in sorted({r.get("set") for r in evals}, key=str):
        mine = [r for r in evals if r.get("set") == name]
        metrics = [k for k, v in mine[-1].items() if isinstance(v, float) and k not in ("time", "samples")]
        shown = [k for k in metrics if k == "mean_recall" or k.endswith("R@1") or k.startswith("top")] or metrics
        series = {k: ([x_of(r, axis) for r in mine if k in r], [r[k] for r in mine if k in r]) for k in shown}
        plots.append(charts.curves(series, f"{name}", "%", marks))
        columns += [k for k in metrics if k not in columns]
        last.append(mine[-1])
    section.add(figures(plots), "<h3>last evaluation of each set</h3>")
    rows = [[r.get("set"), r.get("stage"), r.get("step"), *(r.get(k) for k in columns)] for r in last]
    return section.add(table(["set", "stage", "step", *columns], rows, numeric=tuple(range(1, 3 + len(columns))),
                             attrs='id="eval-table"'))


def events_section(records: list[dict]) -> Section:
    kinds = ("stage_switch", "resume", "checkpoint", "skipped")
    rows = [(r.get("event"), r.get("stage"), r.get("step"),
             ", ".join(f"{k} {v}" for k, v in r.items() if k not in ("time", "event", "stage", "step")))
            for r in records if r.get("event") in kinds]
    section = Section("events", "Events")
    return section.add(table(["event", "stage", "step", "detail"], rows) if rows else note("none"))


def config_section(record: dict) -> Section:
    section = Section("config", "Resolved config")
    section.add(settings_block(record.get("config")) if record.get("config") else
                note("run.json holds no resolved config"))
    versions = record.get("versions")
    if isinstance(versions, dict) and versions:
        section.add("<h3>package versions</h3>", table(["package", "version"], sorted(versions.items(), key=str),
                                                       attrs='id="versions-table"'))
    else:
        section.add(note("the run recorded no package versions"))
    return section


def write_train_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write the report of the run in `run_dir` (default: RUN_DIR/report.html)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunReportError(f"{run_dir}: no such folder")
    records = read_records(run_dir)
    record = read_run_record(run_dir)
    axis = samples_axis(records)
    train = [r for r in records if r.get("event") == "train"]
    name = (record.get("config") or {}).get("name") or run_dir.name
    seen = int(x_of(train[-1], axis)) if train else 0
    span = (records[-1].get("time", 0) - records[0].get("time", 0)) if records else 0
    subtitle = f"{seen:,} samples seen · {len(records)} log records over {span / 60:.1f} min · {run_dir}"
    sections = [curves_section(records, axis), eval_section(records, axis), events_section(records),
                config_section(record)]
    return write_page(Path(out) if out else run_dir / REPORT_NAME, f"run {name}", subtitle, sections)
