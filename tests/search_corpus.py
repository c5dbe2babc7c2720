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


_CACHE: dict = {}


def searchable_corpus(root: Path, images: int = 300, stage1: int = 30, stage2: int = 300) -> Path:
    """The demo corpus (the sample web's coloured shapes), a model `cnclip train` trained on it,
    and its embeddings: the manifest dir, built once per test session."""
    import yaml
    from typer.testing import CliRunner

    from cnclip.corpus import build, parse_recipe
    from cnclip.train.cli import app
    from conftest import REPO, free_port

    if "manifests" in _CACHE:
        return _CACHE["manifests"]
    data = yaml.safe_load((REPO / "recipes" / "demo.yaml").read_text(encoding="utf-8"))
    data.update(output_dir=str(root / "data"), manifest_dir=str(root / "manifests"))
    data["sources"][0].update(port=free_port(), images=images)
    build(parse_recipe(data, "demo"), show_funnel=False)
    config = yaml.safe_load((REPO / "recipes" / "train-demo.yaml").read_text(encoding="utf-8"))
    config["output_dir"] = str(root / "run")
    config["data"] = {**config["data"], "manifest_dir": str(root / "manifests")}
    del config["data"]["train"]  # every shard: the search covers the whole corpus
    config["eval"]["sets"][0]["data"] = str(root / "data" / "shards" / "00000.tar")
    config["stage1"]["steps"], config["stage2"]["steps"], config["eval"]["every"] = stage1, stage2, 10_000
    path = root / "train.yaml"
    path.write_text(yaml.safe_dump(config, allow_unicode=True), encoding="utf-8")
    result = CliRunner().invoke(app, ["train", str(path)])
    assert result.exit_code == 0, result.output
    embed_manifest(root / "manifests", root / "run" / "checkpoints" / "stage2-final.pt")
    _CACHE["manifests"] = root / "manifests"
    return _CACHE["manifests"]
