"""Export a model as a Chinese-CLIP (cn_clip) checkpoint, the layout its training script saves:

    {"epoch": int, "step": int, "name": str, "state_dict": {"module." + name: tensor}}

with the parameter names of cn_clip's CLIP class (train/models.py to_chinese_clip, the inverse of
the conversion that loads cn_clip checkpoints), so cn_clip 1.6's own code loads it:
`cn_clip.clip.load_from_name(OUT, vision_model_name=V, text_model_name=T, input_resolution=R)`,
its training script's `--resume OUT --reset-data-offset --reset-optimizer` (finetuning from it),
and, for its five released structures, its deployment scripts (`--model-arch`, ONNX / TensorRT).

cn_clip builds a model only from its own configs (cn_clip/clip/model_configs: one file per image
tower, one per text tower, joined as `V@T`), so a model is exported only when each tower matches
one of them exactly, its ViT uses QuickGELU (cn_clip's always does) and its vocabulary is cn_clip's
(its tokenizer reads only its own vocab.txt). Anything else is refused in one line naming what
cn_clip lacks.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch

from cnclip._common.atomic import atomic_path
from cnclip._common.errors import CnclipError
from cnclip.train.models import to_chinese_clip
from cnclip.train.tokenizer import BERT_BASE_CHINESE_VOCAB, read_vocab

FORMATS = ("open_clip", "cn_clip")

# cn_clip 1.6's model_configs (what its create_model reads; a test compares these with its files).
# Image towers: vision_layers a list for its ModifiedResNet, a number for its ViT.
CN_CLIP_VISION = {
    "RN50": {"embed_dim": 1024, "image_resolution": 224, "vision_layers": [3, 4, 6, 3], "vision_width": 64,
             "vision_patch_size": None},
    "ViT-B-16": {"embed_dim": 512, "image_resolution": 224, "vision_layers": 12, "vision_width": 768,
                 "vision_patch_size": 16},
    "ViT-B-32": {"embed_dim": 512, "image_resolution": 224, "vision_layers": 12, "vision_width": 768,
                 "vision_patch_size": 32},
    "ViT-L-14": {"embed_dim": 768, "image_resolution": 224, "vision_layers": 24, "vision_width": 1024,
                 "vision_patch_size": 14},
    "ViT-L-14-336": {"embed_dim": 768, "image_resolution": 336, "vision_layers": 24, "vision_width": 1024,
                     "vision_patch_size": 14},
    "ViT-H-14": {"embed_dim": 1024, "image_resolution": 224, "vision_layers": 32, "vision_width": 1280,
                 "vision_head_width": 80, "vision_patch_size": 14},
}
_BERT = {"vocab_size": 21128, "text_attention_probs_dropout_prob": 0.1, "text_hidden_act": "gelu",
         "text_hidden_dropout_prob": 0.1, "text_initializer_range": 0.02, "text_max_position_embeddings": 512,
         "text_type_vocab_size": 2}
CN_CLIP_TEXT = {
    "RBT3-chinese": {**_BERT, "text_hidden_size": 768, "text_intermediate_size": 3072,
                     "text_num_attention_heads": 12, "text_num_hidden_layers": 3},
    "RoBERTa-wwm-ext-base-chinese": {**_BERT, "text_hidden_size": 768, "text_intermediate_size": 3072,
                                     "text_num_attention_heads": 12, "text_num_hidden_layers": 12},
    "RoBERTa-wwm-ext-large-chinese": {**_BERT, "text_hidden_size": 1024, "text_intermediate_size": 4096,
                                      "text_num_attention_heads": 16, "text_num_hidden_layers": 24},
}
# cn_clip's released structures: the names its deployment scripts take as --model-arch.
CN_CLIP_RELEASED = {"RN50@RBT3-chinese": "RN50", "ViT-B-16@RoBERTa-wwm-ext-base-chinese": "ViT-B-16",
                    "ViT-L-14@RoBERTa-wwm-ext-base-chinese": "ViT-L-14",
                    "ViT-L-14-336@RoBERTa-wwm-ext-base-chinese": "ViT-L-14-336",
                    "ViT-H-14@RoBERTa-wwm-ext-large-chinese": "ViT-H-14"}
# What decides the forward pass (dropout and init ranges do not: cn_clip's file may say 0.1 where
# a model trained with 0 is the same network in eval mode).
_TEXT_SHAPE = ("vocab_size", "text_hidden_act", "text_hidden_size", "text_intermediate_size",
               "text_max_position_embeddings", "text_num_attention_heads", "text_num_hidden_layers",
               "text_type_vocab_size")
# open_clip image-tower options cn_clip's towers have as fixed (a model setting another is refused).
_VISION_FIXED = {"mlp_ratio": 4.0, "ls_init_value": None, "patch_dropout": 0.0, "attentional_pool": False,
                 "no_ln_pre": False, "pool_type": "tok", "final_ln_after_pool": False, "output_tokens": False}


class CnClipExportError(CnclipError, ValueError):
    """A model cn_clip cannot express, or an output path that cannot take the checkpoint."""


@dataclass(frozen=True)
class CnClipStructure:
    vision: str  # a cn_clip vision config name (RN50, ViT-B-16, ...)
    text: str  # a cn_clip text config name (RBT3-chinese, ...)
    resolution: int

    @property
    def name(self) -> str:
        return f"{self.vision}@{self.text}"

    def usage(self, path: Path) -> str:
        """How cn_clip loads the file (and deploys it, where it is one of its released structures)."""
        line = (f"cn_clip.clip.load_from_name('{path}', vision_model_name='{self.vision}', "
                f"text_model_name='{self.text}', input_resolution={self.resolution})")
        arch = CN_CLIP_RELEASED.get(self.name)
        return line + (f"; its deploy scripts: --model-arch {arch} --pytorch-ckpt-path {path}" if arch else "")


def _vision_config(model_cfg: dict) -> dict:
    """The model's image tower in cn_clip's config keys (head width 64 where unset, on both sides)."""
    v = model_cfg["vision_cfg"]
    layers = v.get("layers")
    return {"embed_dim": model_cfg["embed_dim"], "image_resolution": v.get("image_size"),
            "vision_layers": list(layers) if isinstance(layers, (list, tuple)) else layers,
            "vision_width": v.get("width"), "vision_patch_size": v.get("patch_size"),
            "vision_head_width": v.get("head_width", 64)}


def _text_config(model_cfg: dict) -> dict:
    hf = model_cfg.get("hf_text_config") or {}
    return {"vocab_size": hf.get("vocab_size"), "text_hidden_act": hf.get("hidden_act"),
            "text_hidden_size": hf.get("hidden_size"), "text_intermediate_size": hf.get("intermediate_size"),
            "text_max_position_embeddings": hf.get("max_position_embeddings"),
            "text_num_attention_heads": hf.get("num_attention_heads"),
            "text_num_hidden_layers": hf.get("num_hidden_layers"), "text_type_vocab_size": hf.get("type_vocab_size")}


def _describe(config: dict, keys: tuple) -> str:
    return ", ".join(f"{k.removeprefix('text_').removeprefix('vision_')} {config.get(k)}" for k in keys)


def cn_clip_structure(model_cfg: dict, vocab: list[str]) -> CnClipStructure:
    """The cn_clip configs that express the model, or a CnClipExportError naming what cn_clip lacks."""
    vision = _vision_config(model_cfg)
    vision_name = next((n for n, c in CN_CLIP_VISION.items() if {"vision_head_width": 64, **c} == vision), None)
    if vision_name is None:
        shown = ("embed_dim", "image_resolution", "vision_layers", "vision_width", "vision_patch_size")
        raise CnClipExportError(f"cn_clip has no image tower config of this model's shape "
                                f"({_describe(vision, shown)}); its configs: {', '.join(CN_CLIP_VISION)}")
    if isinstance(vision["vision_layers"], int) and not model_cfg.get("quick_gelu", False):
        raise CnClipExportError("cn_clip's ViT towers use QuickGELU; this model's uses GELU (quick_gelu: false)")
    _check_fixed_parts(model_cfg)
    text = _text_config(model_cfg)
    text_name = next((n for n, c in CN_CLIP_TEXT.items() if all(c[k] == text[k] for k in _TEXT_SHAPE)), None)
    if text_name is None:
        raise CnClipExportError(f"cn_clip has no text tower config of this model's shape "
                                f"({_describe(text, _TEXT_SHAPE)}); its configs: {', '.join(CN_CLIP_TEXT)}")
    if vocab != read_vocab(BERT_BASE_CHINESE_VOCAB):
        raise CnClipExportError(f"cn_clip's tokenizer reads only its own vocab.txt (bert-base-chinese's 21,128 "
                                f"tokens); this model's vocabulary ({len(vocab)} tokens) is another")
    return CnClipStructure(vision_name, text_name, vision["image_resolution"])


def _check_fixed_parts(model_cfg: dict) -> None:
    """What every cn_clip model is: a BERT text tower read at [CLS] through a bias-free linear
    projection, no logit bias, OpenAI-style image towers."""
    text_cfg, hf = model_cfg.get("text_cfg", {}), model_cfg.get("hf_text_config") or {}
    if hf.get("model_type") != "bert":
        raise CnClipExportError(f"cn_clip's text tower is a BERT; this model's is "
                                f"{hf.get('model_type') or 'not an HF one'}")
    wanted = {"hf_pooler_type": "cls_last_hidden_state_pooler", "hf_proj_type": "linear", "proj_bias": False}
    for key, value in wanted.items():
        if text_cfg.get(key, False if key == "proj_bias" else None) != value:
            raise CnClipExportError(f"cn_clip reads the text tower's [CLS] state through a bias-free linear "
                                    f"projection; this model has text_cfg.{key} {text_cfg.get(key)!r}")
    if hf.get("layer_norm_eps", 1e-12) != 1e-12:
        raise CnClipExportError(f"cn_clip's BERT has layer_norm_eps 1e-12; this model's is {hf['layer_norm_eps']}")
    if model_cfg.get("init_logit_bias") is not None:
        raise CnClipExportError("cn_clip's CLIP has no logit bias; this model has one (init_logit_bias)")
    vision_cfg = model_cfg.get("vision_cfg", {})
    for key, value in _VISION_FIXED.items():
        if key in vision_cfg and vision_cfg[key] != value:
            raise CnClipExportError(f"cn_clip's image towers have no vision_cfg.{key} {vision_cfg[key]!r} "
                                    f"(theirs: {value!r})")


def cn_clip_checkpoint(model: torch.nn.Module, *, epoch: int = 0, step: int = 0, name: str = "cnclip") -> dict:
    """The model as cn_clip's training script saves one (fp32 tensors; cn_clip casts on load)."""
    state = to_chinese_clip({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()})
    return {"epoch": int(epoch), "step": int(step), "name": name,
            "state_dict": {"module." + k: v for k, v in state.items()}}


def write_cn_clip_checkpoint(model: torch.nn.Module, model_cfg: dict, vocab: list[str], out: Union[str, Path], *,
                             epoch: int = 0, step: int = 0, name: str = "cnclip") -> CnClipStructure:
    """Write `model` to the file `out` in cn_clip's format (atomically: a failed write leaves no
    half file); returns the cn_clip structure it has. Refused before anything is written when
    cn_clip cannot express the model."""
    structure = cn_clip_structure(model_cfg, vocab)
    out = Path(out)
    if out.is_dir():
        raise CnClipExportError(f"{out}: a folder; --format cn_clip writes one checkpoint file (e.g. {out}/model.pt)")
    checkpoint = cn_clip_checkpoint(model, epoch=epoch, step=step, name=name)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(out) as tmp:
            torch.save(checkpoint, tmp)
    except (OSError, RuntimeError) as err:  # a file where the folder should be, no permission, a full
        # disk (torch's zip writer raises RuntimeError for a failed write)
        first = next((ln for ln in str(getattr(err, "strerror", None) or err).splitlines() if ln.strip()), "")
        raise CnClipExportError(f"{out}: cannot write the checkpoint ({first.strip() or type(err).__name__})") from None
    return structure


def export_cn_clip(checkpoint: Union[str, Path], out: Union[str, Path],
                   architecture: Optional[str] = None) -> CnClipStructure:
    """`checkpoint` (a cnclip training checkpoint or a Chinese-CLIP one) as a cn_clip checkpoint file."""
    from cnclip.train.factory import load_model_from_checkpoint

    if Path(out).resolve() == Path(checkpoint).resolve():  # the user's checkpoint is never replaced
        raise CnClipExportError(f"cannot export {checkpoint} as a cn_clip checkpoint: {out} is that checkpoint "
                                "itself; name another file")
    with tempfile.TemporaryDirectory() as workdir:
        model, tokenizer, state = load_model_from_checkpoint(checkpoint, workdir, architecture=architecture)
    try:
        structure = write_cn_clip_checkpoint(model, json.loads(state["model_cfg"]), tokenizer.vocab, out,
                                             epoch=state.get("epoch") or 0, step=state.get("step") or 0,
                                             name=Path(checkpoint).stem)
    except CnClipExportError as err:
        raise CnClipExportError(f"cannot export {checkpoint} as a cn_clip checkpoint: {err}") from None
    return structure
