"""cnclip.train: two-stage Chinese CLIP training on cnclip corpus shards.

    from cnclip.train import load_config, train, export_checkpoint
    summary = train(load_config("recipes/train-demo.yaml"))          # stage 1, then stage 2
    export_checkpoint("runs/demo/checkpoints/stage2-final.pt", "exported/demo")

Heavy imports (torch, open_clip, transformers) load on first use, so `cnclip --help` stays fast.
"""

from __future__ import annotations

from typing import Any

from cnclip.train.config import ConfigError, TrainConfig, load_config, parse_config

__all__ = [
    "ConfigError", "TrainConfig", "create_model", "export_checkpoint", "export_cn_clip", "list_models", "load_config",
    "load_model_from_checkpoint", "parse_config", "train",
]

_LAZY = {
    "train": "loop", "load_model_from_checkpoint": "factory", "create_model": "models", "list_models": "models",
    "export_checkpoint": "export", "export_cn_clip": "cn_clip_checkpoint",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from importlib import import_module

        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(name)
