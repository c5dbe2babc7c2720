"""What a run is built from: the tokenizer, the model (with its initial weights) and its image
transforms, from a training config or from a checkpoint alone (eval, export).

Kept apart from loop.py so evaluation and export can rebuild a model without the training loop.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Optional, Union

import torch
from open_clip.model import get_model_preprocess_cfg
from open_clip.transform import PreprocessCfg, image_transform_v2

from cnclip._common.library_log import weights_loaded_after
from cnclip.train import checkpoint as ckpt
from cnclip.train.config import DEFAULT_RESIZE, ConfigError, Resize, TrainConfig
from cnclip.train.data import ShardSet, read_captions, scan_samples
from cnclip.train.models import create_model, load_clip_weights, load_image_tower, rebuild_model
from cnclip.train.tokenizer import BERT_BASE_CHINESE_VOCAB, ChineseTokenizer, build_corpus_vocab, read_vocab


def build_tokenizer(cfg: TrainConfig, shard_set: ShardSet) -> ChineseTokenizer:
    """`tokenizer.vocab`: bert-base-chinese | text-tower | corpus | a vocab.txt path. Every model's
    tokenizer normalizes its texts as the corpus normalizes captions, so training, eval and search agree."""
    choice, length = cfg.tokenizer.vocab, cfg.tokenizer.context_length
    if choice == "bert-base-chinese":
        return ChineseTokenizer.from_file(BERT_BASE_CHINESE_VOCAB, length, normalize=True)
    if choice == "text-tower":
        if cfg.init.text is None:
            raise ConfigError("tokenizer.vocab: text-tower needs init.text (an HF directory with vocab.txt)")
        return ChineseTokenizer.from_file(Path(cfg.init.text) / "vocab.txt", length, normalize=True)
    if choice == "corpus":
        saved = Path(cfg.output_dir) / "vocab.txt"
        if not saved.is_file():  # built once per run directory, so a resumed run gets the same ids
            samples = scan_samples(shard_set.manifest_dir) if shard_set.manifest_dir is not None else None
            if samples is not None:
                captions = samples.select("caption").collect()["caption"].to_list()
            else:
                captions = read_captions(shard_set.shards)
            saved.parent.mkdir(parents=True, exist_ok=True)
            saved.write_text("\n".join(build_corpus_vocab(captions)) + "\n", encoding="utf-8")
        return ChineseTokenizer(read_vocab(saved), length, normalize=True)
    return ChineseTokenizer.from_file(choice, length, normalize=True)


def build_model(cfg: TrainConfig, tokenizer: ChineseTokenizer, device: torch.device, initialise: bool = True):
    """The config's model; `initialise`: with its init weights (False: a checkpoint's come next)."""
    loaded_after = not initialise or cfg.init.image is not None or cfg.init.clip is not None
    with weights_loaded_after() if loaded_after else contextlib.nullcontext():
        model, model_cfg = create_model(
            cfg.model, vocab_size=tokenizer.vocab_size, workdir=Path(cfg.output_dir),
            text_init=cfg.init.text if initialise else None, context_length=cfg.tokenizer.context_length,
            quick_gelu=cfg.quick_gelu)
    if initialise and cfg.init.image is not None:
        load_image_tower(model, cfg.init.image)
    if initialise and cfg.init.clip is not None:
        load_clip_weights(model, cfg.init.clip)
    return model.to(device), model_cfg


def transforms(model: torch.nn.Module, augment: bool = True):
    """open_clip's train (RandomResizedCrop) and eval transforms for the model's preprocess config."""
    cfg = PreprocessCfg(**get_model_preprocess_cfg(model))
    return image_transform_v2(cfg, is_train=augment), image_transform_v2(cfg, is_train=False)


NEITHER = "neither a cnclip training checkpoint nor a Chinese-CLIP (cn_clip) one"


def eval_transform(model: torch.nn.Module, resize: Resize = DEFAULT_RESIZE):
    """The eval transform for an eval protocol. `center_crop`: open_clip's (shorter side to the
    model's size, middle cropped). `squash`: Chinese-CLIP's (cn_clip.clip.utils.image_transform):
    the whole image resized to size×size, bicubic whatever the model's own preprocess says,
    so numbers on non-square benchmarks follow the protocol Chinese-CLIP's published ones use."""
    cfg = get_model_preprocess_cfg(model)
    if resize == "squash":
        cfg = {**cfg, "resize_mode": "squash", "interpolation": "bicubic"}
    else:
        cfg = {**cfg, "resize_mode": "shortest"}
    return image_transform_v2(PreprocessCfg(**cfg), is_train=False)


def load_model_from_checkpoint(path: Union[str, Path], workdir: Union[str, Path],
                               device: Union[str, torch.device] = "cpu", architecture: Optional[str] = None):
    """(model, tokenizer, state) from a cnclip training checkpoint or a Chinese-CLIP one alone, told
    apart by embed/encoder.py's recognizer (one copy of it). `architecture`: a Chinese-CLIP
    checkpoint's zoo name or open_clip config file, where its shapes do not tell it (a cnclip
    checkpoint records its model, so naming one there is an error, not silently ignored)."""
    from cnclip.embed.encoder import is_chinese_clip_checkpoint

    path = Path(path)
    if is_chinese_clip_checkpoint(path):
        return _load_chinese_clip(path, device, architecture)
    # its one line says why a missing, damaged or other file cannot load
    state = ckpt.load_checkpoint(path, not_one=NEITHER)
    if architecture is not None:
        raise ckpt.CheckpointError(f"--architecture: {path} is a cnclip training checkpoint, which records its "
                                   "model; the option is for a Chinese-CLIP checkpoint")
    model = rebuild_model(ckpt.model_config(state), workdir, device)
    model.load_state_dict(state["model"])
    tokenizer = ChineseTokenizer(state["vocab"].rstrip("\n").split("\n"), state["context_length"], normalize=True)
    return model.eval(), tokenizer, state


def _load_chinese_clip(path: Path, device: Union[str, torch.device], architecture: Optional[str]):
    """A Chinese-CLIP checkpoint's model, with a state in a cnclip checkpoint's shape (model_cfg,
    vocab, context_length; stage None, its own step), so eval and export treat both alike."""
    from cnclip.embed.encoder import EncoderError, chinese_clip_model

    try:
        loaded = chinese_clip_model(path, architecture, option="--architecture")
    except EncoderError as err:
        raise ckpt.CheckpointError(str(err)) from None
    state = {"source": "chinese-clip", "architecture": loaded.architecture, "model_cfg": json.dumps(loaded.model_cfg),
             "vocab": loaded.tokenizer.vocab_text, "context_length": loaded.tokenizer.context_length,
             "stage": None, "step": loaded.record.get("step"), "epoch": loaded.record.get("epoch"),
             "stage_complete": None}
    return loaded.model.to(device).eval(), loaded.tokenizer, state
