"""Checkpoints: written atomically, read with `torch.load(weights_only=True)`.

A checkpoint holds everything a run needs to continue exactly: model, optimizer, scheduler and
grad-scaler states, stage and step, every RNG state, each rank's data position, the eval history
that drives the stage switch, and what rebuilds the model elsewhere (the resolved open_clip
config, the tokenizer vocab). Only tensors, numbers, strings, lists and dicts are stored, so
loading never unpickles code.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch

from cnclip._common.atomic import atomic_path, write_text_atomic
from cnclip._common.errors import CnclipError

FORMAT = "cnclip-train-1"


class CheckpointError(CnclipError, ValueError):
    """A file given as a checkpoint that is missing, damaged or not one; or a resume that cannot go on."""


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "python": _tuples_to_lists(random.getstate()),
        "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = state["numpy"]
    np.random.set_state(("MT19937", np_state["key"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuples_to_lists(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_tuples_to_lists(v) for v in value]
    return value


def save_checkpoint(path: Union[str, Path], state: dict) -> Path:
    """Write `state` to `path` atomically: a temporary file in the same folder, fsync, rename,
    fsync the folder. A crash mid-write leaves the previous checkpoint intact."""
    path = Path(path)
    with atomic_path(path, durable=True) as tmp:
        torch.save({"format": FORMAT, **state}, tmp)
    return path


def load_checkpoint(path: Union[str, Path], not_one: str = "not a cnclip training checkpoint") -> dict:
    """The checkpoint's state, or a one-line CheckpointError naming the file and why it cannot load
    (`not_one`: the reason given for a readable file of another kind).

    Whatever `torch.load` raises on a user's file (truncated zip, empty file, a pickle that
    `weights_only=True` refuses to unpickle, an unreadable file) is the file's fault, not ours.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"not a loadable checkpoint: {path} ({'a folder' if path.is_dir() else 'no such file'})")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises many kinds (RuntimeError, EOFError, UnpicklingError...)
        raise CheckpointError(f"not a loadable checkpoint: {path} ({_first_line(err)})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"not a loadable checkpoint: {path} ({not_one})")
    return state


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def model_config(state: dict) -> dict:
    return json.loads(state["model_cfg"])


def write_latest(output_dir: Path, checkpoint: Path) -> None:
    """`latest.txt` names the newest checkpoint (a file, not a symlink: works on every filesystem)."""
    write_text_atomic(output_dir / "latest.txt", checkpoint.name + "\n", durable=True)


def find_latest(output_dir: Union[str, Path]) -> Optional[Path]:
    marker = Path(output_dir) / "checkpoints" / "latest.txt"
    if not marker.is_file():
        return None
    path = marker.parent / marker.read_text(encoding="utf-8").strip()
    return path if path.is_file() else None


def prune(directory: Path, keep: int) -> None:
    """Keep the newest `keep` step checkpoints; stage-end checkpoints are never removed."""
    steps = sorted(directory.glob("stage*-step*.pt"))  # names sort by stage, then zero-padded step
    for old in steps[:-keep]:
        old.unlink(missing_ok=True)
