"""`cnclip export` writes an open_clip local-dir model with identical embeddings and token ids."""

import json

import open_clip
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from cnclip.train.cli import app
from cnclip.train.export import open_clip_kwargs
from cnclip.train.factory import load_model_from_checkpoint
from cnclip.train.loop import train
from test_train_support import shape_samples, shape_shards, tiny_config  # noqa: F401


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, shape_shards):
    root = tmp_path_factory.mktemp("export")
    cfg = tiny_config(root, shape_shards, stage1={"steps": 3}, stage2={"steps": 3})
    train(cfg)
    return root / "run" / "checkpoints" / "stage2-final.pt"


def test_local_dir_model_gives_identical_embeddings(checkpoint, tmp_path):
    result = CliRunner().invoke(app, ["export", str(checkpoint), str(tmp_path / "exported")])
    assert result.exit_code == 0, result.output
    exported = tmp_path / "exported"
    assert {"open_clip_config.json", "open_clip_model.safetensors", "config.json", "vocab.txt",
            "tokenizer_config.json"} <= {p.name for p in exported.iterdir()}

    # open_clip resolves the text tower's folder from the working directory: the export names
    # itself ("."), so from elsewhere the folder is passed (export.py's docstring)
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{exported}",
                                                                 **open_clip_kwargs(exported))
    tokenizer = open_clip.get_tokenizer(f"local-dir:{exported}")
    ours, our_tokenizer, _ = load_model_from_checkpoint(checkpoint, tmp_path / "work")
    model.eval()

    captions = [s["txt"] for s in shape_samples(40, seed=9)] + ["2023年 一个蓝色的菱形 HD", "一只猫"]
    assert torch.equal(tokenizer(captions), our_tokenizer(captions))
    images = torch.stack([preprocess(Image.new("RGB", (90, 70), color)) for color in
                          [(200, 30, 30), (30, 200, 30), (30, 30, 200)]])
    with torch.no_grad():
        assert torch.equal(model.encode_image(images), ours.encode_image(images))
        assert torch.equal(model.encode_text(tokenizer(captions)), ours.encode_text(our_tokenizer(captions)))
        # …and the trained weights, not a fresh init: embeddings differ from a random model's.
        fresh = open_clip.create_model(f"local-dir:{exported}", load_weights=False, pretrained_text=False,
                                       **open_clip_kwargs(exported))
        assert not torch.allclose(fresh.eval().encode_image(images), model.encode_image(images))
    config = json.loads((exported / "open_clip_config.json").read_text())
    assert config["model_cfg"]["text_cfg"]["context_length"] == 52
    assert config["preprocess_cfg"]["size"] == [64, 64]


def test_eval_cli_prints_and_logs_metrics(checkpoint, shape_shards, tmp_path):
    result = CliRunner().invoke(app, ["eval", str(checkpoint), "--data", shape_shards[0], "--log",
                                      str(tmp_path / "eval.jsonl")])
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "eval.jsonl").read_text())
    assert record["images"] == 48 and record["texts"] == 48 and 0 <= record["mean_recall"] <= 100
    assert f'"mean_recall": {record["mean_recall"]}' in result.output
    bad = CliRunner().invoke(app, ["eval", str(checkpoint), "--data", str(tmp_path / "none-*.tar")])
    assert bad.exit_code == 2 and "the patterns match no shard" in bad.output


def test_a_moved_export_loads_from_any_working_directory_with_identical_embeddings(checkpoint, tmp_path,
                                                                                    monkeypatch):
    from cnclip.embed.encoder import load_encoder
    from cnclip.train.export import export_checkpoint

    made = export_checkpoint(checkpoint, tmp_path / "made")
    for name in ("open_clip_config.json", "cnclip_export.json", "tokenizer_config.json"):
        text = (made / name).read_text(encoding="utf-8")
        assert str(tmp_path) not in text and str(checkpoint.parent) not in text, name
    moved = tmp_path / "elsewhere" / "moved"
    moved.parent.mkdir()
    made.rename(moved)
    assert not made.exists()
    record = json.loads((moved / "cnclip_export.json").read_text())
    assert record["checkpoint"] == "stage2-final.pt" and record["stage"] == 2

    ours, our_tokenizer, _ = load_model_from_checkpoint(checkpoint, tmp_path / "work")
    captions = ["一个红色的圆形", "2023年 一个蓝色的菱形 HD", "一只猫"]
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        want_text, want_image = ours.encode_text(our_tokenizer(captions)), ours.encode_image(images)

    def embeddings(model, tokenizer):
        with torch.no_grad():
            model.eval()
            return model.encode_text(tokenizer(captions)), model.encode_image(images)

    other = tmp_path / "cwd"
    other.mkdir()
    monkeypatch.chdir(other)  # neither the old nor the new folder, nor their parent
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{moved}", **open_clip_kwargs(moved))
    got = embeddings(model, open_clip.get_tokenizer(f"local-dir:{moved}"))
    assert torch.equal(got[0], want_text) and torch.equal(got[1], want_image)
    encoder = load_encoder(moved, device="cpu")
    got = embeddings(encoder.model, encoder.tokenizer)
    assert torch.equal(got[0], want_text) and torch.equal(got[1], want_image)
    # The model card's own snippet (open_clip alone, no cnclip) loads the moved folder too.
    card = (moved / "README.md").read_text(encoding="utf-8")
    snippet = card.split("```python\n", 1)[1].split("```", 1)[0].replace("path/to/this/folder", str(moved))
    scope = {}
    exec(snippet, scope)  # noqa: S102 - the card's documented code, run as a user would
    got = embeddings(scope["model"], scope["tokenizer"])
    assert torch.equal(got[0], want_text) and torch.equal(got[1], want_image)
    # As a training `model:`, the exported config rebuilds its tower from the HF config it carries.
    from cnclip.train.models import create_model

    spec = json.loads((moved / "open_clip_config.json").read_text())["hf_text_config"]
    rebuilt, _ = create_model(str(moved / "open_clip_config.json"), vocab_size=spec["vocab_size"],
                              workdir=tmp_path / "rebuild")
    assert rebuilt.text.transformer.config.hidden_size == spec["hidden_size"]
    monkeypatch.chdir(moved)  # open_clip alone, with the folder as the working directory
    model, _, _ = open_clip.create_model_and_transforms("local-dir:.")
    got = embeddings(model, open_clip.get_tokenizer("local-dir:."))
    assert torch.equal(got[0], want_text) and torch.equal(got[1], want_image)
