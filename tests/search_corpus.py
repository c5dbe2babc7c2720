"""The demo corpus and a model trained on it, made once per test session and shared (each costs
tens of seconds on 2 cores): `demo_corpus` is the demo recipe's build (the sample web's coloured
shapes, with 900 images); `searchable_corpus` trains on it with `cnclip train` (both stages, evaluated so its
run report has curves), then rebuilds the same recipe with an `embed` section naming the model,
as a user makes a corpus searchable (only the embed and shard stages run again; the shards are
the same), which publishes MANIFEST_DIR/embeddings/. Tests only read these folders."""

from __future__ import annotations

from pathlib import Path

import pytest

STAGE1_STEPS, STAGE2_STEPS = 30, 600
# Three times the demo recipe's images: 654 samples, 17 or more of each colour and shape, so that
# a top-10 search for one can be all of that kind (with 300 some kinds have 6). The tiny conv tower
# trained 630 steps on them ranks colour and shape right (precision@10 for 红色的圆形: 1.0 with
# training seeds 0, 1 and 2); the tiny ViT, or 330 steps, learns the colours but ranks the shape
# right about half the time (0.4-0.8 for that query, seeds 1 and 2).
DEMO_IMAGES, SEARCH_MODEL = 900, "cn-tiny-rn"


def _demo_recipe(root: Path) -> dict:
    import yaml

    from conftest import REPO, free_port

    data = yaml.safe_load((REPO / "recipes" / "demo.yaml").read_text(encoding="utf-8"))
    data.update(output_dir=str(root / "data"), manifest_dir=str(root / "manifests"))
    data["sources"][0]["port"] = free_port()
    return data


@pytest.fixture(scope="session")
def demo_recipe(tmp_path_factory) -> dict:
    """The demo build (root/data, root/manifests) and its recipe as a mapping."""
    from cnclip.corpus import build, parse_recipe

    root = tmp_path_factory.mktemp("demo_corpus")
    data = _demo_recipe(root)
    data["sources"][0]["images"] = DEMO_IMAGES
    build(parse_recipe(data, "demo"), show_funnel=False)
    return data


@pytest.fixture(scope="session")
def demo_corpus(demo_recipe) -> Path:
    """The root of the demo build: data/ (shards) and manifests/."""
    return Path(demo_recipe["output_dir"]).parent


@pytest.fixture(scope="session")
def searchable_corpus(demo_recipe, demo_corpus) -> Path:
    """The demo corpus with embeddings of a model trained on all of it: its manifest dir (the
    run is demo_corpus / "run")."""
    import yaml
    from typer.testing import CliRunner

    from cnclip.corpus import build, parse_recipe
    from cnclip.train.cli import app
    from conftest import REPO

    root = demo_corpus
    config = yaml.safe_load((REPO / "recipes" / "train-demo.yaml").read_text(encoding="utf-8"))
    config["output_dir"] = str(root / "run")
    config["model"] = SEARCH_MODEL
    config["data"] = {**config["data"], "manifest_dir": str(root / "manifests")}
    del config["data"]["train"]  # every shard: the search covers the whole corpus
    config["eval"]["sets"][0]["data"] = str(root / "data" / "shards" / "00000.tar")
    config["stage1"]["steps"], config["stage2"]["steps"], config["eval"]["every"] = STAGE1_STEPS, STAGE2_STEPS, 200
    path = root / "train.yaml"
    path.write_text(yaml.safe_dump(config, allow_unicode=True), encoding="utf-8")
    result = CliRunner().invoke(app, ["train", str(path)])
    assert result.exit_code == 0, result.output
    data = {**demo_recipe, "embed": {"model": str(root / "run" / "checkpoints" / "stage2-final.pt"), "device": "cpu"}}
    build(parse_recipe(data, "demo"), show_funnel=False)
    return root / "manifests"
