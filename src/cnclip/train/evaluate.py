"""Evaluation: image<->text retrieval recall (Chinese-CLIP's definitions) and zero-shot classification.

Retrieval: a query is a hit at K when any of its ground-truth targets is among the K most similar
candidates (cn_clip/eval/evaluation.py). Text->image: each caption is a query against all images.
Image->text: each image that has a caption is a query against all captions; an image with several
captions (lines of `{key}.txt`, or samples sharing the image's sha256) is a hit when any of them is
in the top K. (Images without captions are still text->image candidates.)
Mean recall is the mean of the six numbers (R@1/5/10 both ways), in percent, as the paper reports.

Zero-shot: open_clip's `build_zero_shot_classifier` with Chinese prompt templates (by default
Chinese-CLIP's 80 translations of OpenAI's ImageNet prompts) over a class-name file; samples carry
`{key}.cls`.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable, Optional, Sequence

import open_clip
import torch

from cnclip.train.clip_benchmark import read_class_names, read_text, resolve_eval_set
from cnclip.train.config import EvalSet
from cnclip.train.data import DataError, eval_batches

KS = (1, 5, 10)
# Chinese-CLIP's 80 ImageNet prompts (OpenAI's, translated by Wukong), in its order, repeats included:
# cn_clip/eval/imagenet_zeroshot_templates.py's `openai_imagenet_template`. (Its zeroshot_evaluation.py
# script uses the longer cvinw_zeroshot_templates.openai_templates, 183: these 80 and ten more, each
# without and with the final 。, and three for flower, food and satellite pictures.)
CHINESE_TEMPLATES = [
    "{}的照片。", "质量差的{}的照片。", "许多{}的照片。", "{}的雕塑。", "难以看到{}的照片。", "{}的低分辨率照片。",
    "{}的渲染。", "涂鸦{}。", "{}的糟糕照片。", "{}的裁剪照片。", "{}的纹身。", "{}的刺绣照片。",
    "很难看到{}的照片。", "{}的明亮照片。", "一张干净的{}的照片。", "一张包含{}的照片。", "{}的深色照片。",
    "{}的手绘画。", "我的{}的照片。", "不自然的{}的照片。", "一张酷的{}的照片。", "{}的特写照片。", "{}的黑白照片。",
    "一幅{}的画。", "一幅{}的绘画。", "一张{}的像素照片。", "{}的雕像。", "一张{}的明亮照片。", "{}的裁剪照片。",
    "人造的{}的照片。", "一张关于{}的照片。", "损坏的{}的jpeg照片。", "{}的模糊照片。", "{}的相片。",
    "一张{}的好照片。", "{}的渲染照。", "视频游戏中的{}。", "一张{}的照片。", "{}的涂鸦。", "{}的近距离照片。",
    "{}的折纸。", "{}在视频游戏中。", "{}的草图。", "{}的涂鸦照。", "{}的折纸形状。", "低分辨率的{}的照片。",
    "玩具{}。", "{}的副本。", "{}的干净的照片。", "一张大{}的照片。", "{}的重现。", "一张漂亮的{}的照片。",
    "一张奇怪的{}的照片。", "模糊的{}的照片。", "卡通{}。", "{}的艺术作品。", "{}的素描。", "刺绣{}。",
    "{}的像素照。", "{}的拍照。", "{}的损坏的照片。", "高质量的{}的照片。", "毛绒玩具{}。", "漂亮的{}的照片。",
    "小{}的照片。", "照片是奇怪的{}。", "漫画{}。", "{}的艺术照。", "{}的图形。", "大{}的照片。", "黑白的{}的照片。",
    "{}毛绒玩具。", "一张{}的深色照片。", "{}的摄影图。", "{}的涂鸦照。", "玩具形状的{}。", "拍了{}的照片。",
    "酷酷的{}的照片。", "照片里的小{}。", "{}的刺青。",
]


def autocast(device: torch.device, precision: str):
    if precision in ("bf16", "fp16"):
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        return torch.autocast(device_type=device.type, dtype=dtype)
    return contextlib.nullcontext()


@torch.no_grad()
def embed_eval_set(model, tokenizer: Callable, patterns: Sequence[str], transform: Callable, *,
                   device: torch.device, precision: str = "fp32", batch_size: int = 256,
                   max_samples: Optional[int] = None, origin: str = "eval",
                   on_batch: Optional[Callable[[int], None]] = None) -> dict:
    """Normalized image and caption embeddings, the caption->image map and the class labels;
    `on_batch(samples)` after each batch of images (a progress bar)."""
    image_feats, groups, labels, texts, text_image = [], {}, [], [], []
    with autocast(device, precision):
        for batch in eval_batches(patterns, transform, batch_size, max_samples, origin):
            feats = model.encode_image(batch.images.to(device), normalize=True).float()
            if on_batch is not None:
                on_batch(len(batch.captions))
            for feat, caps, group, label in zip(feats, batch.captions, batch.groups, batch.labels, strict=True):
                if group not in groups:
                    groups[group] = len(groups)
                    image_feats.append(feat)
                    labels.append(label)
                for cap in caps:
                    texts.append(cap)
                    text_image.append(groups[group])
        text_feats = [model.encode_text(tokenizer(texts[i:i + batch_size]).to(device), normalize=True).float()
                      for i in range(0, len(texts), batch_size)]
    if not image_feats:
        raise DataError(f"{origin}: no readable samples")
    return {
        "images": torch.stack(image_feats),
        "texts": torch.cat(text_feats) if text_feats else torch.empty(0, image_feats[0].shape[0]),
        "text_image": torch.tensor(text_image, dtype=torch.long),
        "labels": labels,
    }


def retrieval_metrics(image_feats: torch.Tensor, text_feats: torch.Tensor, text_image: torch.Tensor) -> dict:
    """Recall@1/5/10 both ways and their mean, in percent (Chinese-CLIP's definitions)."""
    n_images, n_texts = image_feats.shape[0], text_feats.shape[0]
    if n_texts == 0:
        raise DataError("a retrieval set needs captions ({key}.txt lines); this one has none")
    sims = text_feats @ image_feats.T  # [texts, images]
    out: dict[str, float] = {}
    # text -> image: the rank of each caption's own image (only the top 10 are kept, not a full sort).
    top_images = sims.topk(min(max(KS), n_images), dim=1).indices
    for k in KS:
        hits = (top_images[:, :k] == text_image[:, None]).any(dim=1)
        out[f"text_to_image_R@{k}"] = 100.0 * hits.float().mean().item()
    # image -> text: any of the image's captions in its top K; the queries are the captioned images.
    captioned = torch.bincount(text_image, minlength=n_images) > 0
    top_texts = sims.topk(min(max(KS), n_texts), dim=0).indices.T[captioned]  # [captioned images, K]
    mine = text_image[top_texts] == torch.arange(n_images)[captioned][:, None]
    for k in KS:
        out[f"image_to_text_R@{k}"] = 100.0 * mine[:, :k].any(dim=1).float().mean().item()
    out["mean_recall"] = sum(out.values()) / len(out)
    out["images"], out["texts"] = int(image_feats.shape[0]), int(text_feats.shape[0])
    return out


def read_templates(path: Path) -> list[str]:
    """A prompt file: one prompt per line with `{}` (cn_clip, str.format) or `{c}` (clip_benchmark's
    files) where the class name goes; a line with neither would give every class the same prompt.
    Blank lines are skipped: nothing indexes prompts (class names are indexed: read_class_names)."""
    lines = [line.strip() for line in read_text(path).splitlines()]
    templates = [line.replace("{c}", "{}") for line in lines if line]
    if not templates:
        raise DataError(f"{path}: no templates (one prompt per line, {{}} or {{c}} for the class name)")
    for number, template in enumerate(templates, 1):
        if "{}" not in template:
            raise DataError(f"{path}: template {number} ({template[:40]!r}) has no {{}} or {{c}} for the class name")
    return templates


def _fillers(templates: list[str]) -> list[Callable[[str], str]]:
    """Templates as functions: open_clip would str.format them, which any other brace in a prompt breaks."""
    return [lambda name, t=t: t.replace("{}", name) for t in templates]


@torch.no_grad()
def zeroshot_metrics(model, tokenizer: Callable, image_feats: torch.Tensor, labels: list, classnames: list[str],
                     templates: list[str], device: torch.device) -> dict:
    known = [i for i, label in enumerate(labels) if label is not None]
    if not known:
        raise DataError("zero-shot set has no {key}.cls labels")
    # A label no class name has would only lower the accuracy, silently.
    stray = next((labels[i] for i in known if not 0 <= labels[i] < len(classnames)), None)
    if stray is not None:
        raise DataError(f"zero-shot set: a {{key}}.cls label ({stray}) is no index into the "
                        f"{len(classnames)} class names")
    classifier = open_clip.build_zero_shot_classifier(
        model, tokenizer=tokenizer, classnames=classnames, templates=_fillers(templates), num_classes_per_batch=32,
        device=device)
    logits = image_feats[known].to(device) @ classifier.float()
    target = torch.tensor([labels[i] for i in known], device=device)
    out = {}
    for k in (1, 5):
        k_eff = min(k, len(classnames))
        out[f"top{k}"] = 100.0 * (logits.topk(k_eff, dim=1).indices == target[:, None]).any(1).float().mean().item()
    out["images"] = len(known)
    return out


def expected_samples(eval_set: EvalSet) -> Optional[int]:
    """How many samples evaluating the set reads, where the sizes.json beside its shards says (a
    progress bar's total); None when unknown."""
    from cnclip.train.shards import count_samples, expand_patterns

    try:
        eval_set = resolve_eval_set(eval_set)
        total = count_samples(expand_patterns(eval_set.patterns, f"eval.sets[{eval_set.name}]"), None)
    except (DataError, OSError, ValueError):
        return None  # the evaluation itself reports what is wrong with the set
    if total is None or eval_set.max_samples is None:
        return total
    return min(total, eval_set.max_samples)


def evaluate_set(model, tokenizer: Callable, eval_set: EvalSet, transform: Callable, *, device: torch.device,
                 precision: str = "fp32", batch_size: int = 256,
                 on_batch: Optional[Callable[[int], None]] = None) -> dict:
    """One configured eval set -> its metrics (keys prefixed by nothing; the caller names the set)."""
    eval_set = resolve_eval_set(eval_set)
    origin = f"eval.sets[{eval_set.name}]"
    if eval_set.kind == "zeroshot":  # read before the images are embedded: a bad file fails at once
        try:
            classnames = read_class_names(eval_set.classnames)
            templates = read_templates(eval_set.templates) if eval_set.templates else CHINESE_TEMPLATES
        except DataError as err:
            raise DataError(f"{origin}: {err}") from None
    was_training = model.training
    model.eval()
    try:
        emb = embed_eval_set(model, tokenizer, eval_set.patterns, transform, device=device, precision=precision,
                             batch_size=batch_size, max_samples=eval_set.max_samples, origin=origin,
                             on_batch=on_batch)
        if eval_set.kind == "retrieval":
            if emb["texts"].shape[0] == 0:
                raise DataError(f"{origin}: no captions ({{key}}.txt) in "
                                 f"{', '.join(eval_set.patterns)}: a retrieval set needs them "
                                 "(kind: zeroshot evaluates labelled images)")
            return retrieval_metrics(emb["images"].cpu(), emb["texts"].cpu(), emb["text_image"])
        try:
            return zeroshot_metrics(model, tokenizer, emb["images"], emb["labels"], classnames, templates, device)
        except DataError as err:
            raise DataError(f"{origin}: {err}") from None
    finally:
        model.train(was_training)
