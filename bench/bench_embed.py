"""Embedding throughput: the corpus build's embed stage (one download part per task) vs a plain
open_clip batch loop (webdataset over the same tars, the model's own preprocessing, encode_image
and encode_text), same model, batch size and images, in the same run. Target: >= 1.0x.

The model is cn-tiny at random weights, written by the bench as a `cnclip train` checkpoint and
exported as an open_clip local-dir model (what the plain loop loads): no download. Both sides
decode the JPEGs, preprocess, and embed the captions too.

CNCLIP_BENCH_SMALL=1 (bench/sizes.py): 2 parts x 64 images, batch 32.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl
import torch

from shapes import shape_samples, write_shards
from sizes import announce, size

PARTS, PER_PART, BATCH = size((4, 500, 64), (2, 64, 32))
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"红橙黄绿蓝紫色的圆形方三角菱一个张图片画着浅背景上这是"]


def make_model(folder: Path) -> tuple[Path, Path]:
    """(cnclip checkpoint, its open_clip local-dir export) of cn-tiny at seeded random weights."""
    from cnclip.train.checkpoint import save_checkpoint
    from cnclip.train.export import export_checkpoint
    from cnclip.train.models import create_model

    torch.manual_seed(0)
    model, model_cfg = create_model("cn-tiny", vocab_size=len(VOCAB), workdir=folder / "workdir")
    checkpoint = save_checkpoint(folder / "tiny.pt", {
        "model": model.state_dict(), "model_cfg": json.dumps(model_cfg), "vocab": "\n".join(VOCAB) + "\n",
        "context_length": 52, "stage": 2, "step": 0, "stage_complete": True})
    return checkpoint, export_checkpoint(checkpoint, folder / "exported")


def embed_stage(tars: list[str], folder: Path, checkpoint: Path) -> float:
    """The stage's per-part work (stages/embed.py) over every part; returns the seconds taken."""
    from cnclip.corpus.stages.embed import EmbedTask, embed_download_part

    members = pl.DataFrame([(part, f"{part:05d}{i:04d}", part * PER_PART + i, caption)
                            for part, tar in enumerate(tars)
                            for i, caption in enumerate(_captions(tar))],
                           schema={"part": pl.Int64, "key": pl.String, "uid": pl.Int64, "caption": pl.String},
                           orient="row")
    members.write_parquet(folder / "members.parquet")
    tasks = [EmbedTask(tar, folder / "members.parquet", folder / f"embed-{part}.parquet",
                       folder / f"scores-{part}.parquet", part, str(checkpoint), None, "cpu", BATCH, "bench")
             for part, tar in enumerate(tars)]
    embed_download_part(tasks[0])  # the model loads once per worker: not part of the throughput
    started = time.perf_counter()
    for task in tasks:
        embed_download_part(task)
    return time.perf_counter() - started


def _captions(tar: str) -> list[str]:
    import webdataset as wds

    return [sample["txt"].decode("utf-8") for sample in wds.WebDataset(tar, shardshuffle=False)]


def open_clip_loop(tars: list[str], exported: Path) -> tuple[float, np.ndarray]:
    """webdataset -> PIL -> the model's preprocess -> batches -> encode_image / encode_text."""
    import open_clip
    import webdataset as wds

    from cnclip.train.export import open_clip_kwargs

    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{exported}", **open_clip_kwargs(exported))
    tokenizer = open_clip.get_tokenizer(f"local-dir:{exported}")
    model.eval()
    dataset = (wds.WebDataset(tars, shardshuffle=False).decode("pil").to_tuple("jpg", "txt")
               .map_tuple(preprocess, lambda text: text).batched(BATCH))
    started = time.perf_counter()
    out = []
    with torch.no_grad():
        for images, texts in dataset:
            image = model.encode_image(images, normalize=True)
            text = model.encode_text(tokenizer(list(texts)), normalize=True)
            out.append((image * text).sum(-1).numpy())
    return time.perf_counter() - started, np.concatenate(out)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        tars = write_shards(folder / "shards", shape_samples(PARTS * PER_PART, seed=0), per_shard=PER_PART)
        checkpoint, exported = make_model(folder)
        count = PARTS * PER_PART
        baseline, reference = open_clip_loop(tars, exported)
        ours = embed_stage(tars, folder, checkpoint)
        scores = pl.read_parquet(sorted(folder.glob("embed-*.parquet"))).sort("uid")["clip_score"].to_numpy()
    announce()
    print(f"open_clip batch loop (webdataset, batch {BATCH}): {count / baseline:,.0f} images/s")
    print(f"cnclip embed stage (per download part, batch {BATCH}): {count / ours:,.0f} images/s")
    ratio = baseline / ours
    print(f"ratio: {ratio:.2f}x (target >= 1.0x: {'met' if ratio >= 1.0 else 'NOT met'})")
    print(f"clip_score vs the loop's: max difference {np.abs(scores - reference).max():.2e} over {count} pairs")


if __name__ == "__main__":
    main()
