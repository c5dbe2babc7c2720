"""Export a training checkpoint as an open_clip `local-dir:` model, movable as a folder.

    DIR/open_clip_config.json        model_cfg (+ preprocess_cfg), as open_clip reads it
    DIR/open_clip_model.safetensors  the weights
    DIR/config.json                  the BERT text tower's HF config (open_clip builds the tower from it)
    DIR/vocab.txt, tokenizer_config.json   the tokenizer (open_clip's HFTokenizer loads them)
    DIR/cnclip_export.json           where it came from (checkpoint file name and SHA-256, stage, step)
    DIR/README.md                    the model card (model_card.py): data funnel, config, evaluations

No file holds an absolute path, so DIR can be moved or copied to another machine. open_clip 3.3
builds an HF text tower from `text_cfg.hf_model_name` by `AutoConfig.from_pretrained(name)`: a
folder path resolved from the working directory, or a Hub id; it has no form relative to the
model folder and passes no embedded config to the tower (`hf_model_pretrained: false` only skips
the weights, never the config lookup). The export therefore names the folder itself, `"."`:
`open_clip.create_model_and_transforms('local-dir:DIR')` works as is with DIR as the working
directory, and from anywhere else with `**open_clip_kwargs(DIR)` (the text config pointed at DIR,
what cnclip's own loader passes). The tower's HF config is also kept beside `model_cfg` under
`hf_text_config` (open_clip ignores the key), so cnclip rebuilds the tower with no path at all.
(The tokenizer needs nothing: open_clip always loads a local-dir model's tokenizer from DIR.)
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path
from typing import Optional, Union

from open_clip.model import get_model_preprocess_cfg
from safetensors.torch import save_file

from cnclip._common.atomic import atomic_path, write_text_atomic
from cnclip._common.errors import CnclipError
from cnclip.train.factory import load_model_from_checkpoint
from cnclip.train.models import write_text_tower_dir

CONFIG = "open_clip_config.json"
SELF = "."  # text_cfg.hf_model_name / hf_tokenizer_name: the export folder itself


class ExportError(CnclipError, OSError):
    """The export folder cannot be created or written."""


def text_tower_dir(directory: Union[str, Path], text_cfg: dict) -> Path | None:
    """The folder holding the HF tower's config.json that `text_cfg.hf_model_name` names, read
    relative to the model folder (an export's "."); None for a Hub id or a tower with no folder."""
    name = text_cfg.get("hf_model_name")
    if not name:
        return None
    folder = Path(directory) / name
    if (folder / "config.json").is_file():
        return folder
    # An export made before exports named themselves recorded its folder's absolute path, gone
    # once the folder moved: its own config.json is the tower's.
    if Path(name).is_absolute() and (Path(directory) / "config.json").is_file():
        return Path(directory)
    return None


def open_clip_kwargs(directory: Union[str, Path]) -> dict:
    """Keyword arguments for `open_clip.create_model_and_transforms('local-dir:DIR', **...)` that
    make a moved export load from any working directory: its text config with the tower's folder
    as a path open_clip resolves ({} for a model with no folder-relative HF tower)."""
    directory = Path(directory)
    try:
        text_cfg = json.loads((directory / CONFIG).read_text(encoding="utf-8"))["model_cfg"]["text_cfg"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}  # open_clip itself says what is wrong with the folder
    tower = text_tower_dir(directory, text_cfg)
    if tower is None:
        return {}
    return {"text_cfg": {**text_cfg, "hf_model_name": str(tower.resolve()), "hf_model_pretrained": False}}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:  # in blocks: a checkpoint with its optimizer state can be GBs
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def export_checkpoint(checkpoint: Union[str, Path], directory: Union[str, Path], license: str = "other",
                      architecture: Optional[str] = None) -> Path:
    """Write `checkpoint`'s model (a cnclip or Chinese-CLIP checkpoint; `architecture`: the
    latter's zoo name where its shapes do not tell it) as an open_clip local-dir model in
    `directory`, with its model card (`license`: the card's license id, e.g. apache-2.0); returns
    the folder."""
    directory = Path(directory).resolve()
    with tempfile.TemporaryDirectory() as workdir:
        model, tokenizer, state = load_model_from_checkpoint(checkpoint, workdir, architecture=architecture)
    try:
        _write_export(checkpoint, directory, model, tokenizer, state)
        write_text_atomic(directory / "README.md", _card(Path(checkpoint), state, license))
        return directory
    except OSError as err:  # a file where the folder should be, no permission, a full disk
        raise ExportError(f"{directory}: cannot write the export ({err.strerror or err})") from None


def _card(checkpoint: Path, state: dict, license: str) -> str:
    """The model card of the checkpoint's run: its folder is the checkpoint's checkpoints/ parent
    (where the run wrote log.jsonl), else the output_dir its config names."""
    from cnclip.train.model_card import model_card

    config = json.loads(state["config"]) if isinstance(state.get("config"), str) else {}
    run_dir = checkpoint.resolve().parent.parent
    if not (run_dir / "log.jsonl").is_file() and config.get("output_dir"):
        run_dir = Path(config["output_dir"])
    return model_card(config, state, run_dir, license)


def _write_export(checkpoint: Union[str, Path], directory: Path, model, tokenizer, state: dict) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    model_cfg = json.loads(state["model_cfg"])
    spec = model_cfg.pop("hf_text_config", None)
    text_cfg = model_cfg["text_cfg"]
    if spec is not None:
        write_text_tower_dir(directory, spec, spec["vocab_size"])
        text_cfg["hf_model_name"] = text_cfg["hf_tokenizer_name"] = SELF
        text_cfg["hf_model_pretrained"] = False  # the weights are the export's own
    text_cfg["context_length"] = tokenizer.context_length
    tokenizer.save(directory)
    preprocess = {k: list(v) if isinstance(v, tuple) else v for k, v in get_model_preprocess_cfg(model).items()}
    config = {"model_cfg": model_cfg, "preprocess_cfg": preprocess}
    if spec is not None:
        config["hf_text_config"] = spec
    write_text_atomic(directory / CONFIG, json.dumps(config, indent=2, ensure_ascii=False))
    weights = {k: v.contiguous() for k, v in model.state_dict().items()}
    with atomic_path(directory / "open_clip_model.safetensors") as tmp:
        save_file(weights, str(tmp))
    checkpoint = Path(checkpoint)
    write_text_atomic(directory / "cnclip_export.json", json.dumps(
        {"checkpoint": checkpoint.name, "checkpoint_sha256": _sha256(checkpoint), "stage": state["stage"],
         "step": state["step"], "stage_complete": state["stage_complete"]}, indent=2))
    return directory
