"""End to end: a demo corpus build, then `cnclip train` on recipes/train-demo.yaml (fewer steps)."""

import json

import pytest
import yaml
from typer.testing import CliRunner

from cnclip.train.cli import app
from cnclip.train.runlog import read_log
from conftest import REPO

pytestmark = pytest.mark.slow


def test_demo_recipe_trains_both_stages(demo_corpus, tmp_path):
    config = yaml.safe_load((REPO / "recipes" / "train-demo.yaml").read_text(encoding="utf-8"))
    shards = demo_corpus / "data" / "shards"
    config["output_dir"] = str(tmp_path / "run")
    config["data"].update(train=str(shards / "{00000..00001}.tar"), manifest_dir=str(demo_corpus / "manifests"))
    config["eval"]["sets"][0]["data"] = str(shards / "00002.tar")
    config["stage1"]["steps"], config["stage2"]["steps"], config["eval"]["every"] = 60, 120, 60
    path = tmp_path / "train-demo.yaml"
    path.write_text(yaml.safe_dump(config, allow_unicode=True), encoding="utf-8")

    result = CliRunner().invoke(app, ["train", str(path)])
    assert result.exit_code == 0, result.output
    assert "training summary" in result.output and "demo-heldout" in result.output
    evals = [r for r in read_log(tmp_path / "run", "eval")]
    before, after = evals[0]["mean_recall"], evals[-1]["mean_recall"]
    assert after > before + 20, (before, after)
    train_log = read_log(tmp_path / "run", "train")
    assert {r["stage"] for r in train_log} == {1, 2}
    stage1 = [r["loss"] for r in train_log if r["stage"] == 1]
    stage2 = [r["loss"] for r in train_log if r["stage"] == 2]
    assert stage2[-1] < stage1[0] - 1.0
    # Counts came from the build's manifests: epochs are samples seen / 200 training samples.
    sizes = json.loads((shards / "sizes.json").read_text())
    expected_epoch = 180 * 32 / (sizes["00000.tar"] + sizes["00001.tar"])
    assert train_log[-1]["epoch"] == pytest.approx(expected_epoch)
    assert (tmp_path / "run" / "vocab.txt").is_file()  # the corpus vocab, built from the manifests

    exported = CliRunner().invoke(app, ["export", str(tmp_path / "run" / "checkpoints" / "stage2-final.pt"),
                                        str(tmp_path / "exported")])
    assert exported.exit_code == 0 and (tmp_path / "exported" / "open_clip_model.safetensors").is_file()


def test_config_errors_are_one_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("output_dir: x\nmodel: cn-tiny\nbatch_size: 0\n", encoding="utf-8")
    result = CliRunner().invoke(app, ["train", str(path)])
    assert result.exit_code == 2
    output = " ".join(result.output.split())  # rich may wrap long lines
    assert output.startswith("error:")
    assert f"{path}: batch_size: Input should be greater than or equal to 1" in output
    assert f"{path}: data: Field required" in output and f"{path}: stage1: Field required" in output


def test_a_build_manifest_dir_alone_locates_its_shards(demo_corpus):
    from cnclip.train.config import DataSettings
    from cnclip.train.data import resolve_train_shards

    found = resolve_train_shards(DataSettings(manifest_dir=demo_corpus / "manifests"))
    shards = sorted(str(p) for p in (demo_corpus / "data" / "shards").glob("*.tar"))
    sizes = json.loads((demo_corpus / "data" / "shards" / "sizes.json").read_text())
    # Every tar the build wrote: the demo recipe's 100 samples per shard (the last one partial).
    assert found.shards == shards and len(shards) == -(-sum(sizes.values()) // 100) > 1
    assert found.samples == sum(sizes.values())
