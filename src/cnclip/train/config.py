"""Training configs: the YAML that drives `cnclip train`, parsed once into typed objects.

Validated like corpus recipes (unknown keys are errors; each error names the file and the key).
Everything downstream receives a `TrainConfig`; nothing deeper reads YAML.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal, Optional, Union

from pydantic import Field, field_validator, model_validator

from cnclip._common.errors import CnclipError
from cnclip._common.strict import StrictModel, validate_mapping
from cnclip._common.yaml_loader import read_yaml


class ConfigError(CnclipError, ValueError):
    """A training config that cannot run; the message names the file and the key."""


ShardSpec = Union[str, list[str]]


def _as_list(value: ShardSpec | None) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


class InitSettings(StrictModel):
    """Initial weights, all optional local paths (nothing is ever downloaded)."""

    image: Optional[Path] = Field(default=None, description="open_clip or OpenAI CLIP checkpoint for the image tower")
    text: Optional[Path] = Field(default=None, description="HF Chinese RoBERTa directory for the text tower")
    clip: Optional[Path] = Field(default=None, description="a whole Chinese-CLIP / open_clip / cnclip checkpoint")

    @model_validator(mode="after")
    def _clip_alone(self) -> "InitSettings":
        if self.clip is not None and (self.image is not None or self.text is not None):
            raise ValueError("init.clip loads both towers; do not combine it with init.image or init.text")
        return self


class TokenizerSettings(StrictModel):
    # `bert-base-chinese`: the 21,128-token vocab Chinese-CLIP uses (shipped with cnclip);
    # `corpus`: a character vocab built from the training captions (for towers trained from scratch);
    # `text-tower`: vocab.txt of init.text; or a path to any BERT vocab.txt.
    vocab: str = "bert-base-chinese"
    context_length: int = Field(default=52, ge=3, le=512)


class DataSettings(StrictModel):
    train: Optional[ShardSpec] = Field(default=None, description="shard globs or brace patterns")
    corpus: Optional[Path] = Field(default=None, description="a corpus recipe: train on its shards")
    # A folder or an fsspec URL (s3://bucket/manifests): a URL stays a string, which Path would fold.
    manifest_dir: Optional[Union[Path, str]] = Field(
        default=None, description="a build's manifest_dir: sample counts, and the shards when no train/corpus")
    shuffle_buffer: int = Field(default=1000, ge=0)
    resampled: bool = False
    workers: int = Field(default=2, ge=0)
    augment: bool = True
    # Exact resume replays each worker's sample stream up to its position (tar reads, no decoding).
    exact_resume: bool = True

    @field_validator("manifest_dir", mode="before")
    @classmethod
    def _location(cls, value: object) -> object:
        if isinstance(value, str) and "://" not in value:
            return Path(value)
        return value

    @model_validator(mode="after")
    def _one_source(self) -> "DataSettings":
        if self.train is not None and self.corpus is not None:
            raise ValueError("give one of data.train (shard patterns) or data.corpus (a corpus recipe), not both")
        if self.train is None and self.corpus is None and self.manifest_dir is None:
            raise ValueError("give data.train (shard patterns), data.corpus (a corpus recipe) or "
                             "data.manifest_dir (a corpus build's manifests)")
        return self

    @property
    def train_patterns(self) -> list[str]:
        return _as_list(self.train)


class LossSettings(StrictModel):
    # open_clip's ClipLoss options. With both on, each rank's gradient is the exact gradient of the
    # global-batch loss (all_gather keeps its backward), so N processes train like one with N× batch.
    local_loss: bool = True
    gather_with_grad: bool = True


# How an eval image becomes the model's square input: `squash` resizes the whole image to size×size
# (bicubic, no crop: Chinese-CLIP's eval transform, what its published numbers use); `center_crop`
# resizes the shorter side and crops the middle (open_clip's). They differ only on non-square images.
Resize = Literal["squash", "center_crop"]
DEFAULT_RESIZE: Resize = "center_crop"


class EvalSet(StrictModel):
    name: str
    kind: Optional[Literal["retrieval", "zeroshot"]] = Field(
        default=None, description="default: a clip_benchmark folder's dataset_type.txt, else retrieval")
    data: ShardSpec = Field(description="shard patterns, or a clip_benchmark WebDataset folder")
    split: str = Field(default="test", min_length=1, description="a clip_benchmark folder's split subfolder")
    max_samples: Optional[int] = Field(default=None, ge=1)
    classnames: Optional[Path] = Field(default=None, description="zeroshot: one class name per line")
    templates: Optional[Path] = Field(default=None, description="zeroshot: one prompt per line with {} or {c}")
    resize: Optional[Resize] = Field(default=None, description="squash | center_crop; default: eval.resize")

    @model_validator(mode="after")
    def _classnames(self) -> "EvalSet":
        # A clip_benchmark folder brings its own classnames.txt (checked when the folder is read).
        if self.kind == "zeroshot" and self.classnames is None and self.benchmark_dir is None:
            raise ValueError("a zeroshot set needs classnames (a file, one class name per line)")
        return self

    @property
    def patterns(self) -> list[str]:
        return _as_list(self.data)

    @property
    def benchmark_dir(self) -> Optional[Path]:
        """`data` when it names one local folder (clip_benchmark's layout), else None (shard patterns)."""
        if not isinstance(self.data, str) or "://" in self.data or any(ch in self.data for ch in "*?[{"):
            return None
        return Path(self.data) if Path(self.data).is_dir() else None


class EvalSettings(StrictModel):
    every: Optional[int] = Field(default=None, ge=1, description="steps between evaluations; stage ends always")
    sets: list[EvalSet] = Field(default_factory=list)
    batch_size: int = Field(default=256, ge=1)
    at_start: bool = Field(default=True, description="also evaluate before the first step (the 'before' figures)")
    resize: Resize = Field(default=DEFAULT_RESIZE, description="each set's resize unless it names its own")

    def resize_for(self, eval_set: EvalSet) -> Resize:
        """The set's own resize, else the block's."""
        return eval_set.resize or self.resize

    @field_validator("sets")
    @classmethod
    def _unique(cls, value: list[EvalSet]) -> list[EvalSet]:
        names = [s.name for s in value]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"eval set names must be unique, repeated: {', '.join(dupes)}")
        return value


class StageSettings(StrictModel):
    steps: Optional[int] = Field(default=None, ge=0, description="optimizer steps")
    samples: Optional[int] = Field(default=None, ge=0, description="or: training samples (global)")
    lr: float = Field(gt=0)
    warmup: int = Field(default=0, ge=0, description="linear warm-up steps, then cosine decay")
    weight_decay: float = Field(default=0.001, ge=0)
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = Field(default=1e-6, gt=0)
    grad_clip: Optional[float] = Field(default=None, gt=0)
    # Stage 1 only: switch to stage 2 when the mean recall of the first retrieval eval set has not
    # improved for this many evaluations (steps is then the maximum).
    patience: Optional[int] = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _length(self) -> "StageSettings":
        if (self.steps is None) == (self.samples is None):
            raise ValueError("give exactly one of steps or samples")
        return self

    def total_steps(self, global_batch: int) -> int:
        return self.steps if self.steps is not None else math.ceil(self.samples / global_batch)


class TrainConfig(StrictModel):
    name: str = "cnclip"
    output_dir: Path
    seed: int = 0
    model: str = Field(description="zoo name (cnclip.train.list_models()) or an open_clip model config JSON")
    init: InitSettings = Field(default_factory=InitSettings)
    tokenizer: TokenizerSettings = Field(default_factory=TokenizerSettings)
    data: DataSettings
    batch_size: int = Field(ge=1, description="per process, per micro-batch")
    global_batch_size: Optional[int] = Field(default=None, ge=1, description="sets accum_steps from the world size")
    accum_steps: int = Field(default=1, ge=1)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    grad_checkpointing: bool = False
    device: Literal["auto", "cpu", "cuda"] = "auto"
    loss: LossSettings = Field(default_factory=LossSettings)
    max_logit_scale: float = Field(default=100.0, gt=1)
    log_every: int = Field(default=10, ge=1)
    checkpoint_every: Optional[int] = Field(default=None, ge=1)
    keep_checkpoints: int = Field(default=2, ge=1, description="step checkpoints kept (stage ends are always kept)")
    tensorboard: bool = Field(default=False, description="also write TensorBoard events (needs `tensorboard`)")
    quick_gelu: Optional[bool] = Field(default=None, description="override the model config's activation")
    eval: EvalSettings = Field(default_factory=EvalSettings)
    stage1: StageSettings
    stage2: StageSettings

    @model_validator(mode="after")
    def _batch(self) -> "TrainConfig":
        if self.global_batch_size is not None and self.accum_steps != 1:
            raise ValueError("set global_batch_size or accum_steps, not both")
        if self.global_batch_size is not None and self.global_batch_size % self.batch_size:
            raise ValueError(f"global_batch_size ({self.global_batch_size}) is not a multiple of "
                             f"batch_size ({self.batch_size})")
        if self.stage2.patience is not None:
            raise ValueError("stage2.patience: only stage 1 can end early")
        # A set of no declared kind may be a retrieval folder: the trainer checks again once it is read.
        if self.stage1.patience is not None and not any(s.kind != "zeroshot" for s in self.eval.sets):
            raise ValueError("stage1.patience needs a retrieval set in eval.sets")
        if self.stage1.patience is not None and self.eval.every is None:
            raise ValueError("stage1.patience needs eval.every (evaluations during stage 1)")
        return self

    def accumulation(self, world_size: int) -> int:
        """Micro-batches per optimizer step for this world size."""
        if self.global_batch_size is None:
            return self.accum_steps
        per_step = self.batch_size * world_size
        if self.global_batch_size % per_step:
            raise ConfigError(f"global_batch_size ({self.global_batch_size}) is not a multiple of batch_size × "
                              f"processes ({self.batch_size} × {world_size})")
        return self.global_batch_size // per_step

    def global_batch(self, world_size: int) -> int:
        return self.batch_size * world_size * self.accumulation(world_size)


def parse_config(data: dict, origin: str = "<config>") -> TrainConfig:
    return validate_mapping(TrainConfig, data, origin, ConfigError)


def load_config(path: str | Path, overrides: Optional[dict] = None) -> TrainConfig:
    """Read and validate a YAML config; `overrides` (nested dicts) are merged over it first."""
    data = read_yaml(path, ConfigError, "config")
    if overrides and isinstance(data, dict):
        data = merge(data, overrides)
    return parse_config(data, str(path))


def merge(base: dict, overrides: dict) -> dict:
    out = dict(base)
    for key, value in overrides.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out
