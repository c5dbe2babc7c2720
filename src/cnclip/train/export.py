"""Export a training checkpoint as an open_clip `local-dir:` model.

    DIR/open_clip_config.json        model_cfg (+ preprocess_cfg), as open_clip reads it
    DIR/open_clip_model.safetensors  the weights
    DIR/config.json                  the BERT text tower's HF config (open_clip builds the tower from it)
    DIR/vocab.txt, tokenizer_config.json   the tokenizer (open_clip's HFTokenizer loads them)
    DIR/cnclip_export.json           where it came from (checkpoint, stage, step)

then `open_clip.create_model_and_transforms('local-dir:DIR')` and `open_clip.get_tokenizer(...)`
rebuild the model offline. open_clip builds an HF text tower from `text_cfg.hf_model_name`, a path
it resolves from the working directory, so the export records DIR's absolute path there: after
moving DIR, export again (or edit that key).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Optional, Union

from open_clip.model import get_model_preprocess_cfg
from safetensors.torch import save_file

from cnclip._common.errors import CnclipError
from cnclip.train.factory import load_model_from_checkpoint
from cnclip.train.models import write_text_tower_dir


class ExportError(CnclipError, OSError):
    """The export folder cannot be created or written."""


def export_checkpoint(checkpoint: Union[str, Path], directory: Union[str, Path],
                      architecture: Optional[str] = None) -> Path:
    """Write `checkpoint`'s model (a cnclip or Chinese-CLIP checkpoint; `architecture`: the
    latter's zoo name where its shapes do not tell it) as an open_clip local-dir model in
    `directory`; returns it."""
    directory = Path(directory).resolve()
    with tempfile.TemporaryDirectory() as workdir:
        model, tokenizer, state = load_model_from_checkpoint(checkpoint, workdir, architecture=architecture)
    try:
        return _write_export(checkpoint, directory, model, tokenizer, state)
    except OSError as err:  # a file where the folder should be, no permission, a full disk
        raise ExportError(f"{directory}: cannot write the export ({err.strerror or err})") from None


def _write_export(checkpoint: Union[str, Path], directory: Path, model, tokenizer, state: dict) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    model_cfg = json.loads(state["model_cfg"])
    spec = model_cfg.pop("hf_text_config", None)
    text_cfg = model_cfg["text_cfg"]
    if spec is not None:
        write_text_tower_dir(directory, spec, spec["vocab_size"])
        text_cfg["hf_model_name"] = text_cfg["hf_tokenizer_name"] = str(directory)
    text_cfg["context_length"] = tokenizer.context_length
    tokenizer.save(directory)
    preprocess = {k: list(v) if isinstance(v, tuple) else v for k, v in get_model_preprocess_cfg(model).items()}
    (directory / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess}, indent=2, ensure_ascii=False),
        encoding="utf-8")
    weights = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(weights, str(directory / "open_clip_model.safetensors"))
    (directory / "cnclip_export.json").write_text(json.dumps(
        {"checkpoint": str(Path(checkpoint).resolve()), "stage": state["stage"], "step": state["step"],
         "stage_complete": state["stage_complete"]}, indent=2), encoding="utf-8")
    return directory
