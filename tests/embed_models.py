"""Tiny models of each kind the embed loaders read, made without training (seeded weights):
a cnclip checkpoint, its open_clip local-dir export, and a Chinese-CLIP (cn_clip) checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import torch

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"红橙黄绿蓝紫色的圆形方三角菱一个张图片"]


def tiny_cnclip_checkpoint(path: Path, seed: int = 0) -> Path:
    """A `cnclip train`-format checkpoint of the cn-tiny zoo model at random weights."""
    from cnclip.train.checkpoint import save_checkpoint
    from cnclip.train.models import create_model

    torch.manual_seed(seed)
    model, model_cfg = create_model("cn-tiny", vocab_size=len(VOCAB), workdir=path.parent / "workdir")
    return save_checkpoint(path, {"model": model.state_dict(), "model_cfg": json.dumps(model_cfg),
                                  "vocab": "\n".join(VOCAB) + "\n", "context_length": 52,
                                  "stage": 2, "step": 0, "stage_complete": True})


def tiny_local_dir(directory: Path) -> Path:
    """The open_clip local-dir export of a tiny cnclip checkpoint (`cnclip export`)."""
    from cnclip.train.export import export_checkpoint

    checkpoint = tiny_cnclip_checkpoint(directory.parent / "for-export.pt", seed=1)
    return export_checkpoint(checkpoint, directory)


def tiny_chinese_clip(path: Path, vocab_size: int = 300):
    """A cn_clip CLIP of cn-tiny's shapes, saved as cn_clip's training script saves it, with a
    vocab.txt of `vocab_size` tokens beside it; returns the reference model too."""
    from cn_clip.clip.model import CLIP

    torch.manual_seed(0)
    reference = CLIP(
        embed_dim=64, image_resolution=64, vision_layers=2, vision_width=64, vision_patch_size=16,
        vocab_size=vocab_size, text_attention_probs_dropout_prob=0.0, text_hidden_act="gelu",
        text_hidden_dropout_prob=0.0, text_hidden_size=64, text_initializer_range=0.02, text_intermediate_size=128,
        text_max_position_embeddings=64, text_num_attention_heads=2, text_num_hidden_layers=2,
        text_type_vocab_size=2, vision_head_width=32).eval()
    torch.save({"epoch": 1, "step": 10, "state_dict": {"module." + k: v for k, v in reference.state_dict().items()}},
               path)
    vocab = VOCAB + [f"[unused{i}]" for i in range(vocab_size - len(VOCAB))]
    (path.parent / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    return path, reference
