"""Shared helpers for the training tests (no tests here): synthetic shape shards, tiny configs, and
one demo-corpus build shared by every training test module that needs real corpus shards."""

from __future__ import annotations

import io
import json
import os
import random
from pathlib import Path

import pytest
import webdataset as wds

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("CNCLIP_QUIET", "1")

import torch  # noqa: E402

torch.set_num_threads(1)

from cnclip.corpus.sources.sample_web import COLORS, SHAPES, draw_shape  # noqa: E402
from cnclip.train.config import TrainConfig, parse_config  # noqa: E402

# Captions in the sample web's style: the colour and the shape are what a model can learn.
TEMPLATES = ["一个{c}的{s}", "画着{c}{s}的图片", "浅色背景上的{c}{s}", "这是一个{c}{s}"]


def shape_samples(count: int, seed: int, side: int = 64) -> list[dict]:
    """(jpg bytes, caption, class) for random coloured shapes: 6 colours × 4 shapes = 24 classes."""
    rng = random.Random(seed)
    out = []
    for _i in range(count):
        ci, si = rng.randrange(len(COLORS)), rng.randrange(len(SHAPES))
        color, shape = COLORS[ci], SHAPES[si][0]
        buffer = io.BytesIO()
        draw_shape(color[2], shape, rng, side=side).save(buffer, format="JPEG", quality=90)
        caption = rng.choice(TEMPLATES).format(c=color[0], s=shape)
        out.append({"jpg": buffer.getvalue(), "txt": caption, "cls": ci * len(SHAPES) + si, "name": color[0] + shape})
    return out


def write_shards(folder: Path, samples: list[dict], per_shard: int, *, shuffle_captions: bool = False,
                 with_cls: bool = False, seed: int = 0) -> list[str]:
    """WebDataset tars like the corpus build's: {key}.jpg, {key}.txt, {key}.json; plus sizes.json."""
    folder.mkdir(parents=True, exist_ok=True)
    captions = [s["txt"] for s in samples]
    if shuffle_captions:  # break every image-caption link, keep the caption distribution
        random.Random(seed).shuffle(captions)
    paths, sizes = [], {}
    for start in range(0, len(samples), per_shard):
        shard = start // per_shard
        path = folder / f"{shard:05d}.tar"
        with wds.TarWriter(str(path)) as writer:
            for i, (sample, caption) in enumerate(zip(samples[start:start + per_shard],
                                                      captions[start:start + per_shard], strict=True)):
                record = {"__key__": f"{shard:05d}{i:04d}", "jpg": sample["jpg"], "txt": caption,
                          "json": json.dumps({"caption": caption}, ensure_ascii=False)}
                if with_cls:
                    record["cls"] = str(sample["cls"])
                writer.write(record)
        sizes[path.name] = len(samples[start:start + per_shard])
        paths.append(str(path))
    (folder / "sizes.json").write_text(json.dumps(sizes))
    return paths


def class_names() -> list[str]:
    return [c[0] + s[0] for c in COLORS for s in SHAPES]


def tiny_config(tmp: Path, train: str | list[str], **overrides) -> TrainConfig:
    data = {
        "name": "tiny",
        "output_dir": str(tmp / "run"),
        "seed": 0,
        "model": "cn-tiny",
        "tokenizer": {"vocab": "corpus"},
        "data": {"train": train, "workers": 0, "shuffle_buffer": 50},
        "batch_size": 16,
        "log_every": 1,
        "stage1": {"steps": 6, "lr": 2e-3, "warmup": 1, "weight_decay": 0.0},
        "stage2": {"steps": 6, "lr": 1e-3, "warmup": 1, "weight_decay": 0.0},
    }
    for key, value in overrides.items():
        data[key] = {**data[key], **value} if isinstance(value, dict) and isinstance(data.get(key), dict) else value
    return parse_config(data, "test-config")


def write_config(folder: Path, train: str | list[str], **overrides) -> str:
    """tiny_config as the YAML file a user would pass to `cnclip train`; returns its path."""
    import yaml

    cfg = tiny_config(folder, train, **overrides)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "train.yaml"
    path.write_text(yaml.safe_dump(json.loads(cfg.model_dump_json()), allow_unicode=True), encoding="utf-8")
    return str(path)


def dropout_model(folder: Path, dropout: float = 0.1) -> str:
    """cn-tiny with text dropout, like every real zoo model (cn-ViT-B-16: 0.1): a config file path.
    Exact-resume checks need it, since dropout is what draws from the RNG during training."""
    from cnclip.train.models import ZOO_DIR

    cfg = json.loads((ZOO_DIR / "cn-tiny.json").read_text(encoding="utf-8"))
    cfg["hf_text_config"]["hidden_dropout_prob"] = cfg["hf_text_config"]["attention_probs_dropout_prob"] = dropout
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "tiny-dropout.json"
    path.write_text(json.dumps(cfg), encoding="utf-8")
    return str(path)


_CACHE: dict[str, object] = {}


@pytest.fixture(scope="session")
def shape_shards(tmp_path_factory):
    """4 shards × 48 learnable shape samples, shared by every training test (built once)."""
    if "shapes" not in _CACHE:
        folder = tmp_path_factory.mktemp("shapes")
        _CACHE["shapes"] = write_shards(folder, shape_samples(192, seed=1), per_shard=48)
    return _CACHE["shapes"]
