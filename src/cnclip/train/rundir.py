"""A run folder (`output_dir`) that reruns like a corpus build.

When a run starts it records its resolved config in `<output_dir>/run.json`, with the versions of
Python and of the packages that shape its results (`versions`, outside the fingerprint: a rerun
of the same config under upgraded packages still resumes, and the record keeps the versions the
run started with). Training the same
config into that folder again resumes the run from its latest checkpoint, or, when the requested
stages are done, says so and writes nothing. A folder holding a run of another config (or run
files without a `run.json`) is refused unless `fresh`, which removes only what a run writes there
(`RUN_FILES`, `RUN_DIRS`, the checkpoints it names) and keeps anything else in the folder.
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


def changed_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two resolved configs (for the refusal message)."""
    if isinstance(old, dict) and isinstance(new, dict):
        keys = list(dict.fromkeys([*old, *new]))
        return [k for key in keys for k in changed_keys(old.get(key), new.get(key), f"{prefix}{key}.")]
    return [] if old == new else [prefix.rstrip(".") or "(config)"]


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
    record, mine = _read_record(out), config_record(cfg)
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
    if record is not None and record.get("fingerprint") != mine["fingerprint"]:
        keys = changed_keys(record.get("config"), mine["config"]) if "config" in record else [f"unreadable {RECORD}"]
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
