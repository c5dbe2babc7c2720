"""Test helper: the published embeddings of a built corpus, made the way the embed stage publishes them
(MANIFEST_DIR/embeddings/NNNNN.parquet per shard: key, uid, clip_score, image/text embeddings in
float16, plus model.json). Search tests build on this until builds with an embed section exist."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import polars as pl
from PIL import Image

from cnclip.corpus.manifests.schemas import PUBLISHED_EMBEDDINGS
from cnclip.embed import store
from cnclip.embed.encoder import load_encoder
from cnclip.search.shards import ShardMembers


def embed_manifest(manifest_dir: Path, model_path: Path) -> Path:
    """Encode every shard's images and captions with `model_path`; returns the embeddings folder."""
    encoder = load_encoder(model_path, "cpu")
    members = ShardMembers(manifest_dir)
    out = Path(manifest_dir) / "embeddings"
    for part in sorted((Path(manifest_dir) / "samples").glob("*.parquet")):
        samples = pl.read_parquet(part, columns=["key", "shard", "uid", "caption"])
        images = [Image.open(io.BytesIO(members.image(shard, key)[1]))
                  for shard, key in samples.select("shard", "key").rows()]
        image = encoder.encode_images(images)
        text = encoder.encode_texts(samples["caption"].to_list())
        scores = np.einsum("ij,ij->i", image, text).astype(np.float32)
        frame = store.frame_of(samples["uid"], image, text, key=samples["key"], clip_score=scores)
        store.write_part(frame.select(list(PUBLISHED_EMBEDDINGS.columns)), out / part.name, PUBLISHED_EMBEDDINGS)
    store.write_model_record(out, str(model_path), encoder.dim)
    return out
