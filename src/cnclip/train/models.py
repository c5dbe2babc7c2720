"""Model zoo: open_clip model configs (JSON in cnclip/train/model_configs/) built by open_clip.

Every zoo model is an open_clip `CustomTextCLIP`: open_clip's image tower (ViT or ModifiedResNet)
and open_clip's HF text tower over a BERT, pooled at the [CLS] state's last hidden layer with a
bias-free linear projection, which is Chinese-CLIP's text architecture. (open_clip's `cls_pooler`
would take BERT's pooler output, a dense+tanh layer Chinese-CLIP does not have.)

A zoo file is an open_clip model config plus one key, `hf_text_config`: the BERT's shape. open_clip
builds an HF tower from a directory holding `config.json`, so `create_model` writes that directory
(or uses the Chinese RoBERTa directory given as initial weights), points `text_cfg.hf_model_name`
at it, registers the resolved config with `open_clip.add_model_config` and calls
`open_clip.create_model`.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path
from typing import Any, Optional, Union

import open_clip
import torch
from torch import nn

from cnclip._common.atomic import atomic_path, write_json_atomic
from cnclip._common.console import warn
from cnclip._common.errors import CnclipError
from cnclip._common.library_log import weights_loaded_after

ZOO_DIR = Path(__file__).parent / "model_configs"
_EXTRA_KEYS = ("_comment", "hf_text_config")


class ModelError(CnclipError, ValueError):
    """A model name, config file or initial-weights file that cannot be used."""


def list_models() -> list[str]:
    """Zoo names: the paper's five sizes and the tiny CPU configs."""
    return sorted(p.stem for p in ZOO_DIR.glob("*.json"))


def get_model_config(model: str) -> dict:
    """A zoo name or a path to an open_clip model config JSON -> the config dict (a copy)."""
    path = ZOO_DIR / f"{model}.json"
    if not path.is_file():
        path = Path(model)
        if not path.is_file():
            raise ModelError(f"unknown model {model!r}: not a zoo name ({', '.join(list_models())}) "
                             f"nor a config file")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ModelError(f"{path}: cannot read model config ({err})") from None
    if "model_cfg" in cfg:  # an open_clip_config.json (an exported local-dir: model, which keeps
        # its tower's HF config beside model_cfg so the tower is rebuilt without its folder's path)
        cfg = {**cfg["model_cfg"], **({"hf_text_config": cfg["hf_text_config"]} if "hf_text_config" in cfg else {})}
    missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if k not in cfg]
    if missing:
        raise ModelError(f"{path}: not an open_clip model config (missing {', '.join(missing)})")
    return cfg


def write_text_tower_dir(directory: Path, hf_text_config: dict, vocab_size: int) -> Path:
    """A directory with the BERT's config.json: what open_clip's HF tower builds from."""
    from transformers import AutoConfig

    spec = dict(hf_text_config)
    spec["vocab_size"] = vocab_size
    config = AutoConfig.for_model(**spec)
    directory.mkdir(parents=True, exist_ok=True)
    # Every process of a run writes the same file, which the others may be reading: write a
    # temporary file and rename it, so a reader never sees a half-written config.json.
    with atomic_path(directory / "config.json") as tmp:
        config.to_json_file(tmp)
    return directory


def _check_text_dir(text_dir: Path, spec: Optional[dict], vocab_size: int) -> None:
    config_path = text_dir / "config.json"
    if not config_path.is_file():
        raise ModelError(f"{text_dir}: not an HF model directory (no config.json)")
    found = json.loads(config_path.read_text(encoding="utf-8"))
    if found.get("vocab_size") != vocab_size:
        raise ModelError(f"{text_dir}: vocab_size {found.get('vocab_size')} differs from the tokenizer's "
                         f"{vocab_size} (use tokenizer.vocab: text-tower)")
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads"):
        if spec and key in spec and found.get(key) != spec[key]:
            raise ModelError(f"{text_dir}: {key} {found.get(key)} differs from the model config's {spec[key]}")


def create_model(
    model: str,
    *,
    vocab_size: int,
    workdir: Union[str, Path],
    text_init: Optional[Union[str, Path]] = None,
    context_length: Optional[int] = None,
    quick_gelu: Optional[bool] = None,
    device: Union[str, torch.device] = "cpu",
) -> tuple[nn.Module, dict]:
    """Build a zoo model (or one from an open_clip config file) with open_clip.

    `text_init`: an HF Chinese RoBERTa directory whose weights initialise the text tower.
    Returns the model and the resolved open_clip config (what a checkpoint records).
    """
    cfg = get_model_config(model)
    spec = cfg.get("hf_text_config")
    text_cfg = dict(cfg["text_cfg"])
    workdir = Path(workdir)
    if context_length is not None:
        text_cfg["context_length"] = context_length
    if text_init is not None:
        text_dir = Path(text_init).resolve()
        _check_text_dir(text_dir, spec, vocab_size)
    elif spec is not None:
        text_dir = write_text_tower_dir(workdir / "text_tower", spec, vocab_size).resolve()
    else:
        text_dir = None  # a plain open_clip config: its own text tower
    if text_dir is not None:
        text_cfg["hf_model_name"] = text_cfg["hf_tokenizer_name"] = str(text_dir)
    resolved = {k: v for k, v in cfg.items() if k not in _EXTRA_KEYS}
    resolved["text_cfg"] = text_cfg
    if quick_gelu is not None:
        resolved["quick_gelu"] = quick_gelu
    name = register(resolved, workdir)
    built = open_clip.create_model(name, pretrained_text=text_init is not None, device=device)
    if text_init is not None:
        # transformers loads weights in the dtype they were saved in (dtype="auto"): a directory
        # saved in fp16/bf16 would give a half-precision tower inside an fp32 model.
        transformer = getattr(getattr(built, "text", None), "transformer", None)
        if transformer is not None:
            transformer.float()
    if spec is not None:
        resolved["hf_text_config"] = {**spec, "vocab_size": vocab_size}
    _use_sdpa(built)
    return built, resolved


def register(model_cfg: dict, workdir: Path) -> str:
    """Write `model_cfg` under workdir and add it to open_clip's registry; returns its name."""
    digest = hashlib.sha256(json.dumps(model_cfg, sort_keys=True).encode()).hexdigest()[:12]
    name = f"cnclip-{digest}"
    path = Path(workdir) / "model_configs" / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.is_file():  # atomically: the other processes of a run may be reading it
        write_json_atomic(path, model_cfg)
    if name not in open_clip.list_models():
        open_clip.add_model_config(path)
    return name


def _use_sdpa(model: nn.Module) -> None:
    # The image towers call nn.MultiheadAttention with need_weights=False, which runs PyTorch's
    # scaled_dot_product_attention; the HF BERT is asked for its SDPA attention explicitly.
    transformer = getattr(getattr(model, "text", None), "transformer", None)
    if transformer is not None and hasattr(transformer, "set_attn_implementation"):
        try:
            transformer.set_attn_implementation("sdpa")
        except (ValueError, ImportError) as err:  # an architecture without SDPA support
            warn(f"text tower keeps its default attention: {err}")


def rebuild_model(model_cfg: dict, workdir: Union[str, Path], device: Union[str, torch.device] = "cpu") -> nn.Module:
    """The architecture a checkpoint recorded (random weights; load the state dict after)."""
    cfg = json.loads(json.dumps(model_cfg))
    spec = cfg.pop("hf_text_config", None)
    if spec is not None:
        text_dir = write_text_tower_dir(Path(workdir) / "text_tower", spec, spec["vocab_size"]).resolve()
        cfg["text_cfg"]["hf_model_name"] = cfg["text_cfg"]["hf_tokenizer_name"] = str(text_dir)
    name = register(cfg, Path(workdir))
    with weights_loaded_after():  # the caller loads the checkpoint's weights
        model = open_clip.create_model(name, pretrained_text=False, device=device)
    _use_sdpa(model)
    return model


# --- initial weights ------------------------------------------------------------------------------

def read_state_dict(path: Union[str, Path]) -> dict[str, torch.Tensor]:
    """Tensors from a safetensors file, a torch checkpoint (loaded with weights_only=True; a
    `state_dict`/`model` entry and DDP's `module.` prefix are unwrapped) or an OpenAI TorchScript
    archive (the format of OpenAI's released CLIP files)."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: no such checkpoint file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        elif _is_torchscript(path):
            state = torch.jit.load(str(path), map_location="cpu").state_dict()
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - a damaged file makes each reader raise its own kinds
        first = next((line for line in str(err).splitlines() if line.strip()), type(err).__name__)
        raise ModelError(f"{path}: cannot read checkpoint ({first.strip()})") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not state:
        raise ModelError(f"{path}: no state dict found")
    return {(k[7:] if k.startswith("module.") else k): v for k, v in state.items() if isinstance(v, torch.Tensor)}


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("constants.pkl") for name in archive.namelist())


def load_image_tower(model: nn.Module, path: Union[str, Path]) -> None:
    """Copy an open_clip or OpenAI CLIP checkpoint's image tower (`visual.*`) into `model.visual`.

    Both use OpenAI's parameter names for the ViT and ModifiedResNet towers. A ViT's position
    embeddings are resized by open_clip when the image size differs; a ResNet tower's must match.
    """
    state = read_state_dict(path)
    visual = {k: v for k, v in state.items() if k.startswith("visual.")}
    if not visual:
        raise ModelError(f"{path}: no image tower weights (no 'visual.*' keys)")
    _check_resnet_size(visual, model, path)
    try:
        open_clip.model.resize_pos_embed(visual, model)
        result = model.visual.load_state_dict({k[len("visual."):]: v for k, v in visual.items()}, strict=False)
    except RuntimeError as err:  # shape mismatches
        raise ModelError(f"{path}: image tower does not match the model: {_first_problem(err)}") from None
    if result.missing_keys or result.unexpected_keys:
        raise ModelError(f"{path}: image tower does not match the model: missing {result.missing_keys[:5]}, "
                         f"unexpected {result.unexpected_keys[:5]}")


# Chinese-CLIP (cn_clip) parameter names -> this model's, read both ways (one table, so the two
# directions cannot drift apart): (theirs, ours, transposed). A name ending in "." is a prefix:
# `bert.*` is the HF BERT; `text_projection` [width, embed] is the transposed weight of the linear
# projection. Every other name (the image tower, logit_scale) is the same on both sides.
CHINESE_CLIP_NAMES = (("bert.", "text.transformer.", False), ("text_projection", "text.proj.weight", True))
# BERT's pooler: Chinese-CLIP never uses it (its released files may still carry one).
_POOLERS = ("bert.pooler.", "text.transformer.pooler.")


def _renamed(state: dict[str, torch.Tensor], to_ours: bool) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        if key.startswith(_POOLERS):
            continue
        for theirs, ours, transposed in CHINESE_CLIP_NAMES:
            source, target = (theirs, ours) if to_ours else (ours, theirs)
            if key == source or (source.endswith(".") and key.startswith(source)):
                key, value = target + key[len(source):], value.t().contiguous() if transposed else value
                break
        out[key] = value
    return out


def convert_chinese_clip(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Chinese-CLIP (cn_clip) parameter names -> this model's (CHINESE_CLIP_NAMES)."""
    return _renamed(state, to_ours=True)


def to_chinese_clip(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """This model's parameter names -> Chinese-CLIP's, as its CLIP class names them (the inverse
    of convert_chinese_clip)."""
    return _renamed(state, to_ours=False)


def load_clip_weights(model: nn.Module, path: Union[str, Path]) -> None:
    """A whole checkpoint into `model`: a Chinese-CLIP checkpoint, a cnclip checkpoint or an
    open_clip state dict of the same architecture. Every parameter must match."""
    state = read_state_dict(path)
    if any(k.startswith("bert.") for k in state):
        state = convert_chinese_clip(state)
    expected = model.state_dict()
    state = {k: v for k, v in state.items() if k in expected or not k.endswith("position_ids")}
    _check_resnet_size(state, model, path)
    try:
        open_clip.model.resize_pos_embed(state, model)
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatches
        raise ModelError(f"{path}: checkpoint does not match the model: {_first_problem(err)}") from None
    if result.missing_keys or result.unexpected_keys:
        raise ModelError(f"{path}: checkpoint does not match the model: missing {result.missing_keys[:5]}, "
                         f"unexpected {result.unexpected_keys[:5]}")


def _check_resnet_size(state: dict[str, torch.Tensor], model: nn.Module, path: Union[str, Path]) -> None:
    """open_clip resizes only ViT position embeddings; a ModifiedResNet's attention pool has a grid of
    (image size / 32)² + 1 of them, so a tower trained at another image size cannot load."""
    key = "visual.attnpool.positional_embedding"
    attnpool = getattr(getattr(model, "visual", None), "attnpool", None)
    if key not in state or attnpool is None:
        return
    theirs, ours = state[key].shape[0], attnpool.positional_embedding.shape[0]
    if theirs != ours:
        side = lambda n: round((n - 1) ** 0.5) * 32  # noqa: E731
        raise ModelError(f"{path}: the ResNet image tower was trained at {side(theirs)} px and the model uses "
                         f"{side(ours)} px; only ViT position embeddings are resized (set the model's "
                         f"vision_cfg.image_size to {side(theirs)})")


def _first_problem(err: Exception) -> str:
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    return lines[1] if len(lines) > 1 else lines[0]


def parameter_count(model: nn.Module) -> dict[str, Any]:
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    return {"total": count(model), "image": count(model.visual), "text": count(model.text)}
