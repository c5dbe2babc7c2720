"""A run folder (`output_dir`) that reruns like a corpus build.

When a run starts it records its resolved config in `<output_dir>/run.json`, with the versions of
Python and of the packages that shape its results (`versions`, outside the fingerprint: a rerun
of the same config under upgraded packages still resumes, and the record keeps the versions the
run started with). Training the same
config into that folder again resumes the run from its latest checkpoint, or, when the requested
stages are done, says so and writes nothing. A folder holding a run of another config (or run
files without a `run.json`) is refused unless `fresh`, which removes only what a run writes there
(`RUN_FILES`, `RUN_DIRS`, the checkpoints it names) and keeps anything else in the folder. A record
written before a config field existed lacks its key: that field at its default is the same config
(a new field's default keeps what earlier versions did), any other value of it is another config.
"""

from __future__ import annotations

import hashlib
import json
import platform
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from pydantic import BaseModel

from cnclip._common.atomic import write_json_atomic
from cnclip._common.errors import CnclipError
from cnclip.train.checkpoint import find_latest
from cnclip.train.config import TrainConfig

RECORD = "run.json"
RECORD_FORMAT = "cnclip-run-1"
LIBRARY_LOG = "libraries.log"  # what open_clip, transformers and webdataset log (library_log.py)
RUN_FILES = ("log.jsonl", "vocab.txt", RECORD, LIBRARY_LOG)  # beside them: the corpus vocab, the logs, the record
RUN_DIRS = ("tensorboard", "text_tower", "model_configs")
CHECKPOINT_NAME = re.compile(r"stage(\d+)-(final|step\d{8})\.pt")


class RunDirError(CnclipError):
    """An output_dir that holds another run, or that cannot be written."""


@dataclass(frozen=True)
class RunPlan:
    """What a `train` call does in its output_dir."""

    resume: Optional[Path]  # the checkpoint to continue from (None: from the start)
    finished: Optional[Path] = None  # set when the requested stages are already done: this checkpoint
    remove: tuple[Path, ...] = ()  # a run's files to delete first (--fresh)
    write_record: bool = False  # run.json is absent or belongs to the removed run


# Distributions whose versions a run records (import names differ: open_clip is open_clip_torch).
VERSIONED = ("cnclip", "torch", "torchvision", "open_clip_torch", "transformers", "webdataset", "numpy", "pillow",
             "polars", "img2dataset", "safetensors", "tensorboard")


def package_versions() -> dict[str, Optional[str]]:
    """Python's and each VERSIONED distribution's version (None where it is not installed), read
    from the installed metadata so nothing is imported for it."""
    from importlib import metadata

    versions: dict[str, Optional[str]] = {"python": platform.python_version()}
    for name in VERSIONED:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def config_record(cfg: TrainConfig) -> dict:
    """What identifies a run: its resolved config and that config's fingerprint."""
    resolved = json.loads(cfg.model_dump_json())
    digest = hashlib.sha256(json.dumps(resolved, sort_keys=True).encode()).hexdigest()[:20]
    return {"format": RECORD_FORMAT, "fingerprint": digest, "config": resolved}


def _read_record(out: Path) -> Optional[dict]:
    path = out / RECORD
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def run_files(out: Path) -> list[Path]:
    """What earlier runs wrote in `out` (and only that): the paths `fresh` removes."""
    found = [out / name for name in RUN_FILES + RUN_DIRS if (out / name).exists()]
    checkpoints = out / "checkpoints"
    if checkpoints.is_dir():
        found += sorted(p for p in checkpoints.iterdir()
                        if CHECKPOINT_NAME.fullmatch(p.name) or p.name == "latest.txt")
    return found


_ABSENT = object()  # a key one side lacks: unlike any value, None included


def changed_keys(old: Any, new: Any, path: str = "") -> list[str]:
    """Key paths whose values differ between two resolved configs (for the refusal message):
    dotted for mappings, `[i]` for the items of equal-length lists of mappings (`eval.sets[0].split`,
    as validation errors name them)."""
    if isinstance(old, dict) and isinstance(new, dict):
        keys = list(dict.fromkeys([*old, *new]))
        return [k for key in keys
                for k in changed_keys(old.get(key, _ABSENT), new.get(key, _ABSENT), f"{path}.{key}" if path else key)]
    if (isinstance(old, list) and isinstance(new, list) and len(old) == len(new)
            and all(isinstance(item, dict) for item in old + new)):
        return [k for i, (a, b) in enumerate(zip(old, new, strict=True)) for k in changed_keys(a, b, f"{path}[{i}]")]
    return [] if old == new else [path or "(config)"]


def _with_defaults(stored: Any, current: Any, model: Any) -> Any:
    """`stored` (a run.json config) with each key it lacks filled from `current` (this config,
    resolved as JSON; `model`: the same as objects) where this config holds that field at its default.

    A newer cnclip adds fields whose defaults keep what earlier versions did, and a run recorded
    before that has no such key: the default is what that run used, so it is no change. A key the
    record lacks whose value here is not the default stays missing, and so counts as changed."""
    if isinstance(stored, dict) and isinstance(current, dict) and isinstance(model, BaseModel):
        filled = {key: _with_defaults(value, current.get(key), getattr(model, key, None))
                  for key, value in stored.items()}
        for name, field in type(model).model_fields.items():
            if (name not in stored and name in current and not field.is_required()
                    and getattr(model, name) == field.get_default(call_default_factory=True)):
                filled[name] = current[name]
        return filled
    if (isinstance(stored, list) and isinstance(current, list) and isinstance(model, (list, tuple))
            and len(stored) == len(current) == len(model)):
        return [_with_defaults(*items) for items in zip(stored, current, model, strict=True)]
    return stored


def config_changes(record: dict, cfg: TrainConfig) -> list[str]:
    """What differs between a recorded run's config and `cfg` ([] when it is the same run).

    The fingerprint covers the whole resolved config, so a record written before a field existed
    has another one; equal fingerprints are the same config, otherwise the configs are compared
    with the record's missing defaults filled in (`_with_defaults`)."""
    mine = config_record(cfg)
    if record.get("fingerprint") == mine["fingerprint"]:
        return []
    stored = record.get("config")
    if not isinstance(stored, dict):
        return [f"unreadable {RECORD}"]
    return changed_keys(_with_defaults(stored, mine["config"], cfg), mine["config"])


def _finished(checkpoint: Path, stages: list[int]) -> bool:
    """A `stageN-final.pt` as the latest checkpoint leaves nothing to do for stages <= N."""
    match = CHECKPOINT_NAME.fullmatch(checkpoint.name)
    return bool(match) and match.group(2) == "final" and max(stages) <= int(match.group(1))


def plan_run(cfg: TrainConfig, stages: list[int], resume: Optional[str | Path] = None,
             fresh: bool = False) -> RunPlan:
    """Decide, reading only, what this call does in cfg.output_dir (every rank decides alike).

    `resume`: None (continue this config's run if there is one), "latest" (its newest checkpoint,
    which must exist) or a checkpoint path (continue from it, as asked).
    """
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise RunDirError(f"output_dir: {out} is a file, not a folder")
    record = _read_record(out)
    existing = run_files(out) if out.is_dir() else []
    if fresh:
        explicit = Path(resume).resolve() if resume not in (None, "latest") else None
        if resume == "latest" or (explicit is not None and explicit in [p.resolve() for p in existing]):
            raise RunDirError(f"--fresh removes {out}'s run, so it cannot resume from it (drop --resume, "
                              "or copy the checkpoint elsewhere first)")
        return RunPlan(Path(resume) if explicit else None, remove=tuple(existing), write_record=True)
    if record is None and existing:
        raise RunDirError(f"output_dir: {out} holds run files ({existing[0].name}, ...) but no {RECORD}; "
                          "--fresh replaces that run (keeping other files), or choose another output_dir")
    keys = config_changes(record, cfg) if record is not None else []
    if keys:
        raise RunDirError(f"output_dir: {out} holds a run of another config (changed: {', '.join(keys[:5])}"
                          f"{', ...' if len(keys) > 5 else ''}); --fresh replaces that run, or choose another "
                          "output_dir")
    latest = find_latest(out)
    write_record = record is None
    if resume == "latest":
        if latest is None:
            raise RunDirError(f"{out}/checkpoints: no checkpoint to resume")
        return RunPlan(latest, write_record=write_record)
    if resume is not None:
        return RunPlan(Path(resume), write_record=write_record)
    if latest is not None and _finished(latest, stages):
        return RunPlan(None, finished=latest)
    return RunPlan(latest, write_record=write_record)


def apply_plan(cfg: TrainConfig, plan: RunPlan) -> None:
    """Rank 0 only: remove the replaced run's files and record this run's config."""
    out = Path(cfg.output_dir)
    try:
        for path in plan.remove:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
        if plan.write_record:
            write_json_atomic(out / RECORD, {**config_record(cfg), "versions": package_versions()})
    except OSError as err:
        raise RunDirError(f"output_dir: cannot write {out} ({err.strerror or err})") from None
