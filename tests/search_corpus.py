"""Test helper: a searchable corpus, as a user makes one: build the demo corpus, train on it with
`cnclip train`, then rebuild the same recipe with an `embed` section naming the model (only the
embed and shard stages run again; the shards are the same), which publishes
MANIFEST_DIR/embeddings/."""

from __future__ import annotations

from pathlib import Path

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
    data["embed"] = {"model": str(root / "run" / "checkpoints" / "stage2-final.pt"), "device": "cpu"}
    build(parse_recipe(data, "demo"), show_funnel=False)
    _CACHE["manifests"] = root / "manifests"
    return _CACHE["manifests"]
