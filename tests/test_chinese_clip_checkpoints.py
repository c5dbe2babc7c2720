"""`cnclip eval` and `cnclip export` take a Chinese-CLIP (cn_clip) checkpoint directly: the model
they build gives cn_clip's own embeddings, eval prints what an equivalent cnclip checkpoint gets,
and a file of neither kind is one line."""

import json
from pathlib import Path

import open_clip
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from cnclip.cli import app
from cnclip.train.checkpoint import save_checkpoint
from cnclip.train.export import open_clip_kwargs
from cnclip.train.factory import load_model_from_checkpoint
from cnclip.train.models import ZOO_DIR, convert_chinese_clip, create_model
from embed_models import tiny_chinese_clip
from test_train_support import shape_shards  # noqa: F401

cn_clip = pytest.importorskip("cn_clip.clip")
runner = CliRunner()
CAPTIONS = ["一个红色的圆形", "画着蓝色方形的图片", "浅色背景上的绿色三角", "2023年NBA总决赛", "一只猫"]


@pytest.fixture(scope="module")
def chinese_clip(tmp_path_factory):
    """A cn-tiny-shaped cn_clip checkpoint over cn_clip's own 21,128-token vocab (no vocab.txt
    beside it: the loader takes cn_clip's), and the cn_clip model it was saved from."""
    path, reference = tiny_chinese_clip(tmp_path_factory.mktemp("cn_clip") / "epoch1.pt", vocab_size=21128)
    (path.parent / "vocab.txt").unlink()
    return path, reference


def _pixels():
    from torchvision.transforms import Compose, Normalize, Resize, ToTensor

    # cn_clip's image_transform at the model's 64 px (what its own scripts feed the model)
    transform = Compose([Resize((64, 64)), ToTensor(),
                         Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))])
    return torch.stack([transform(Image.new("RGB", (90, 70), c)) for c in [(200, 30, 30), (30, 200, 30), (30, 30, 200)]])


def test_loader_gives_cn_clips_own_embeddings(chinese_clip, tmp_path):
    path, reference = chinese_clip
    model, tokenizer, state = load_model_from_checkpoint(path, tmp_path / "w")
    tokens = cn_clip.tokenize(CAPTIONS)
    assert torch.equal(tokenizer(CAPTIONS), tokens)  # cn_clip's vocab and its tokenizer's ids
    with torch.no_grad():
        assert torch.allclose(model.encode_image(_pixels()), reference.encode_image(_pixels()), atol=1e-4)
        assert torch.allclose(model.encode_text(tokens), reference.encode_text(tokens), atol=1e-4)
    assert (state["source"], state["architecture"], state["stage"], state["step"]) == ("chinese-clip", "cn-tiny", None, 10)


def _equivalent_cnclip_checkpoint(reference, path):
    """The same weights as a `cnclip train` checkpoint of cn-tiny, made without the loader under test."""
    model, model_cfg = create_model("cn-tiny", vocab_size=21128, workdir=path.parent / "work")
    model.load_state_dict(convert_chinese_clip(reference.state_dict()))
    vocab = Path(cn_clip.__path__[0], "vocab.txt").read_text(encoding="utf-8")
    return save_checkpoint(path, {"model": model.state_dict(), "model_cfg": json.dumps(model_cfg),
                                  "vocab": vocab, "context_length": 52,
                                  "stage": 2, "step": 0, "stage_complete": True})


def test_eval_prints_the_metrics_of_an_equivalent_cnclip_checkpoint(chinese_clip, shape_shards, tmp_path):
    path, reference = chinese_clip
    equivalent = _equivalent_cnclip_checkpoint(reference, tmp_path / "equivalent.pt")
    records = []
    for checkpoint in (path, equivalent):
        log = tmp_path / f"{checkpoint.stem}.jsonl"
        result = runner.invoke(app, ["eval", str(checkpoint), "--data", shape_shards[0], "--device", "cpu",
                                     "--log", str(log)])
        assert result.exit_code == 0, result.output
        records.append(json.loads(log.read_text()))
        assert json.dumps(records[-1], ensure_ascii=False) in result.output
    theirs, ours = ({k: v for k, v in r.items() if k not in ("checkpoint", "stage", "step")} for r in records)
    assert theirs == ours and theirs["images"] == 48 and theirs["texts"] == 48
    assert (records[0]["stage"], records[0]["step"]) == (None, 10)


def test_export_of_a_chinese_clip_checkpoint_is_an_open_clip_model_with_its_embeddings(chinese_clip, tmp_path):
    path, reference = chinese_clip
    result = runner.invoke(app, ["export", str(path), str(tmp_path / "exported")])
    assert result.exit_code == 0, result.output
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'exported'}",
                                                        **open_clip_kwargs(tmp_path / "exported"))
    tokenizer = open_clip.get_tokenizer(f"local-dir:{tmp_path / 'exported'}")
    tokens = cn_clip.tokenize(CAPTIONS)
    assert torch.equal(tokenizer(CAPTIONS), tokens)
    with torch.no_grad():
        assert torch.allclose(model.eval().encode_image(_pixels()), reference.encode_image(_pixels()), atol=1e-4)
        assert torch.allclose(model.encode_text(tokens), reference.encode_text(tokens), atol=1e-4)
    record = json.loads((tmp_path / "exported" / "cnclip_export.json").read_text())
    assert (record["stage"], record["step"]) == (None, 10)


def _error(argv) -> str:
    result = runner.invoke(app, argv)
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert result.exit_code == 2 and len(lines) == 1, result.output
    return lines[0]


def test_a_file_of_neither_kind_is_one_line(tmp_path):
    torch.save({"state_dict": {"visual.conv1.weight": torch.zeros(2)}, "epoch": 3}, tmp_path / "other.pt")
    (tmp_path / "notes.pt").write_text("a note, not weights\n")
    for argv in (["eval", "{}", "--data", str(tmp_path / "x.tar")], ["export", "{}", str(tmp_path / "out")]):
        line = _error([a.format(tmp_path / "other.pt") for a in argv])
        assert line == (f"error: not a loadable checkpoint: {tmp_path / 'other.pt'} (neither a cnclip training "
                        "checkpoint nor a Chinese-CLIP (cn_clip) one)")
        line = _error([a.format(tmp_path / "notes.pt") for a in argv])
        assert line.startswith(f"error: not a loadable checkpoint: {tmp_path / 'notes.pt'} (")
    assert not (tmp_path / "out").exists()


def test_architecture_option(chinese_clip, tmp_path):
    path, reference = chinese_clip
    # shapes no zoo model has: the error names the option
    state = {"module." + k: v for k, v in reference.state_dict().items() if not k.startswith("bert.encoder.layer.1.")}
    torch.save({"state_dict": state}, tmp_path / "odd.pt")
    line = _error(["export", str(tmp_path / "odd.pt"), str(tmp_path / "out")])
    assert line == (f"error: {tmp_path / 'odd.pt'}: cannot tell the Chinese-CLIP architecture from the checkpoint "
                    "(no zoo model matches its shapes); name it (--architecture: a zoo name or an open_clip config file)")
    line = _error(["export", str(tmp_path / "odd.pt"), str(tmp_path / "out"), "--architecture", "cn-tiny-rn"])
    assert line.startswith(f"error: {tmp_path / 'odd.pt'}: checkpoint does not match the model: ")
    # a part of a checkpoint, its architecture named: one line too
    part = {"module." + k: v for k, v in reference.state_dict().items() if k.startswith("bert.encoder.")}
    torch.save({"state_dict": part}, tmp_path / "part.pt")
    line = _error(["eval", str(tmp_path / "part.pt"), "--data", str(tmp_path / "x.tar"), "--architecture", "cn-tiny"])
    assert line == (f"error: {tmp_path / 'part.pt'}: not a whole Chinese-CLIP checkpoint "
                    "(no bert.embeddings.word_embeddings.weight)")
    # named where the shapes tell it too: the same model
    result = runner.invoke(app, ["export", str(path), str(tmp_path / "named"), "--architecture", "cn-tiny"])
    assert result.exit_code == 0, result.output
    # a cnclip checkpoint records its model: naming one is refused, not ignored
    equivalent = _equivalent_cnclip_checkpoint(reference, tmp_path / "equivalent.pt")
    line = _error(["eval", str(equivalent), "--data", str(tmp_path / "x.tar"), "--architecture", "cn-tiny"])
    assert line == (f"error: --architecture: {equivalent} is a cnclip training checkpoint, which records its model; "
                    "the option is for a Chinese-CLIP checkpoint")
    assert not (tmp_path / "out").exists()


def test_a_vit_checkpoint_keeps_cn_clips_quick_gelu_whatever_the_named_config_says(chinese_clip, tmp_path):
    path, reference = chinese_clip
    config = json.loads((ZOO_DIR / "cn-tiny.json").read_text())
    config.pop("quick_gelu")  # a config of cn-tiny's shapes with open_clip's default GELU
    (tmp_path / "gelu.json").write_text(json.dumps(config))
    model, _, _ = load_model_from_checkpoint(path, tmp_path / "w", architecture=str(tmp_path / "gelu.json"))
    tokens = cn_clip.tokenize(CAPTIONS)
    with torch.no_grad():
        assert torch.allclose(model.encode_image(_pixels()), reference.encode_image(_pixels()), atol=1e-4)
        assert torch.allclose(model.encode_text(tokens), reference.encode_text(tokens), atol=1e-4)
