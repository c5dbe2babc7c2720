"""The embed stage on a learnable set: the sample web's coloured shapes with Chinese captions, a
few pairs with wrong captions and a few re-encoded copies planted in the metadata, scored by a
model `cnclip train` trained on other shapes."""

import io
import json

import numpy as np
import polars as pl
import pytest
from PIL import Image
from typer.testing import CliRunner

from cnclip.corpus import build, parse_recipe
from cnclip.corpus.sources.sample_web import COLORS, SHAPES
from cnclip.train.cli import app
from test_train_support import shape_samples, shape_shards, write_config  # noqa: F401

pytestmark = pytest.mark.slow

MATCHED, SHUFFLED, COPIES = 24, 8, 6


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, shape_shards):
    root = tmp_path_factory.mktemp("embed-train")
    config = write_config(root, shape_shards, stage1={"steps": 30}, stage2={"steps": 60})
    result = CliRunner().invoke(app, ["train", config])
    assert result.exit_code == 0, result.output
    return root / "run" / "checkpoints" / "stage2-final.pt"


def _planted(folder):
    """(url, caption) rows: one image per colour and shape with its caption (uids 0-23), re-encoded
    copies of the first six (24-29), then eight images captioned with another colour and shape."""
    pool = shape_samples(400, seed=11)
    firsts = {}
    for sample in pool:
        firsts.setdefault(sample["cls"], sample)
    matched = [firsts[c] for c in sorted(firsts)]
    assert len(matched) == len(COLORS) * len(SHAPES) == MATCHED
    others = [s for s in pool if s not in matched][:SHUFFLED]
    rows, images = [], []
    for sample in matched:
        images.append(sample["jpg"])
        rows.append(sample["txt"])
    for sample in matched[:COPIES]:
        buffer = io.BytesIO()
        Image.open(io.BytesIO(sample["jpg"])).save(buffer, format="JPEG", quality=85)
        images.append(buffer.getvalue())
        rows.append(sample["txt"])
    for i, sample in enumerate(others):
        colour, shape = sample["cls"] // len(SHAPES), sample["cls"] % len(SHAPES)
        wrong = next(m for m in matched[i:] + matched if m["cls"] // len(SHAPES) != colour
                     and m["cls"] % len(SHAPES) != shape)
        images.append(sample["jpg"])
        rows.append(wrong["txt"])
    urls = []
    for i, data in enumerate(images):
        (folder / f"{i:03d}.jpg").write_bytes(data)
        urls.append(f"file://{folder / f'{i:03d}.jpg'}")
    return pl.DataFrame({"url": urls, "caption": rows})


@pytest.fixture(scope="module")
def scored(tmp_path_factory, checkpoint):
    root = tmp_path_factory.mktemp("embed-build")
    (root / "images").mkdir()
    _planted(root / "images").write_parquet(root / "planted.parquet")
    kept = MATCHED + COPIES
    data = {
        "name": "scored", "output_dir": str(root / "out"), "manifest_dir": str(root / "manifests"),
        "sources": [{"name": "planted", "kind": "metadata", "path": str(root / "planted.parquet")}],
        "download": {"processes": 1, "threads": 4, "timeout": 3, "retries": 0, "samples_per_part": 20,
                     "allow_local_files": [str(root / "images")]},
        "image": {"size": 64, "min_side": 16}, "shard": {"samples_per_shard": 10, "processes": 1},
        # the copies are left to semantic dedup; the tiny model puts every image within a cosine of
        # 0.9996 of some other, a re-encoded copy within 0.99999
        "dedup": {"exact": False, "near": False, "semantic": {"clusters": 4, "max_similarity": 0.9999}},
        "embed": {"model": str(checkpoint), "batch_size": 8, "device": "cpu"},
        "filter": {"clip_score": {"keep_fraction": kept / (kept + SHUFFLED)}},
    }
    recipe = parse_recipe(data, "scored")
    funnel = build(recipe, show_funnel=False)
    return recipe, funnel


@pytest.fixture(scope="module")
def sampled(tmp_path_factory, checkpoint, scored):
    """The same build with a k-means sample smaller than the rows semantic dedup sees."""
    recipe, _ = scored
    root = tmp_path_factory.mktemp("embed-sampled")
    data = recipe.model_dump(mode="json", exclude_none=True)
    data.update(output_dir=str(root / "out"), manifest_dir=str(root / "manifests"), name="sampled")
    data["dedup"]["semantic"]["sample"] = 16
    sampled = parse_recipe(data, "sampled")
    build(sampled, show_funnel=False)
    return sampled


def _rejected(recipe):
    return pl.read_parquet(recipe.manifest_dir / "rejected" / "embed.parquet")


def test_the_trained_model_separates_matched_from_shuffled_pairs(scored):
    recipe, _ = scored
    scores = pl.read_parquet(recipe.output_dir / "work" / "embed" / "*.parquet", columns=["uid", "clip_score"])
    assert scores.height == MATCHED + COPIES + SHUFFLED
    shuffled = scores.filter(pl.col("uid") >= MATCHED + COPIES)["clip_score"].to_numpy()
    matched = scores.filter(pl.col("uid") < MATCHED + COPIES)["clip_score"].to_numpy()
    auc = (matched[:, None] > shuffled[None, :]).mean() + 0.5 * (matched[:, None] == shuffled[None, :]).mean()
    assert auc >= 0.9, auc


def test_the_clip_score_filter_drops_the_shuffled_pairs(scored):
    recipe, funnel = scored
    low = _rejected(recipe).filter(pl.col("reason") == "embed:low_clip_score")
    assert low.height == SHUFFLED  # the build's top keep_fraction: exactly as many as were planted
    caught = set(low["uid"].to_list()) & set(range(MATCHED + COPIES, MATCHED + COPIES + SHUFFLED))
    assert len(caught) >= SHUFFLED - 1, low.select("uid", "detail")
    assert low["stage"].unique().to_list() == ["embed"]
    assert all(d.startswith("clip_score ") and "outside the top" in d for d in low["detail"].to_list())
    row = next(s for s in funnel["stages"] if s["stage"] == "embed")
    assert row["rejected"] == {"embed:low_clip_score": SHUFFLED}


def test_semantic_dedup_drops_the_copies_and_nothing_else(scored):
    recipe, _ = scored
    rejected = _rejected(recipe)
    samples = pl.read_parquet(recipe.manifest_dir / "samples" / "*.parquet")
    low = set(rejected.filter(pl.col("reason") == "embed:low_clip_score")["uid"].to_list())
    semantic = rejected.filter(pl.col("reason") == "dedup:semantic_duplicate").sort("uid")
    # each copy whose original passed the filter, named after the original's key
    expected = [MATCHED + i for i in range(COPIES) if i not in low and MATCHED + i not in low]
    assert semantic["uid"].to_list() == expected, semantic.select("uid", "duplicate_of_uid", "detail")
    assert semantic["duplicate_of_uid"].to_list() == [uid - MATCHED for uid in expected]
    key_of = dict(zip(samples["uid"].to_list(), samples["key"].to_list(), strict=True))
    assert semantic["duplicate_of"].to_list() == [key_of[uid - MATCHED] for uid in expected]
    assert semantic["stage"].unique().to_list() == ["dedup"]


def test_published_embeddings_follow_the_samples(scored):
    recipe, funnel = scored
    manifests = recipe.manifest_dir
    samples = pl.read_parquet(manifests / "samples" / "*.parquet")
    assert samples.columns[samples.columns.index("phash") + 1] == "clip_score"
    assert funnel["samples"] == samples.height
    for part in sorted((manifests / "samples").glob("*.parquet")):
        rows = pl.read_parquet(part)
        embedded = pl.read_parquet(manifests / "embeddings" / part.name)
        assert embedded.columns == ["key", "uid", "clip_score", "image_embedding", "text_embedding"]
        assert embedded["key"].to_list() == rows["key"].to_list()
        assert embedded["clip_score"].to_list() == rows["clip_score"].to_list()
        image = embedded["image_embedding"].to_numpy().astype(np.float32)
        text = embedded["text_embedding"].to_numpy().astype(np.float32)
        assert np.allclose((image * text).sum(1), rows["clip_score"].to_numpy(), atol=5e-3)
    record = json.loads((manifests / "embeddings" / "model.json").read_text())
    assert record == {"model": recipe.embed.model, "loaded_as": f"cnclip-checkpoint:{recipe.embed.model}",
                      "width": 64, "precision": "fp32"}
    checksums = json.loads((manifests / "checksums.json").read_text())["files"]
    assert "embeddings/model.json" in checksums and "embeddings/00000.parquet" in checksums


def test_a_sample_smaller_than_the_build_drops_the_same_copies(scored, sampled):
    recipe, _ = scored
    centroids = pl.read_parquet(sampled.output_dir / "work" / "embed-semantic" / "centroids.parquet")
    assert centroids["trained_on"].sum() == 16 < MATCHED + COPIES  # the rows the filter kept outnumber it
    columns = ["uid", "reason", "duplicate_of_uid", "duplicate_of"]
    semantic = [_rejected(r).filter(pl.col("reason") == "dedup:semantic_duplicate").sort("uid").select(columns)
                for r in (recipe, sampled)]
    assert semantic[0].height and semantic[1].equals(semantic[0])
