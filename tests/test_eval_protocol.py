"""The evaluation protocol: squash (Chinese-CLIP's eval transform) against center_crop (open_clip's)."""

from __future__ import annotations

import io

import pytest
import torch
import webdataset as wds
from PIL import Image

from cnclip.train.config import EvalSet, parse_config
from cnclip.train.evaluate import evaluate_set
from cnclip.train.factory import eval_transform
from cnclip.train.models import create_model

SIDE = 64  # cn-tiny's image size


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    model, _ = create_model("cn-tiny", vocab_size=21128, workdir=tmp_path_factory.mktemp("tiny"))
    return model


def noisy_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """A non-square picture with detail everywhere, so any difference in cropping or filtering shows."""
    gen = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (height, width, 3), generator=gen, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy(), "RGB")


def test_squash_is_chinese_clips_eval_transform(tiny_model):
    from cn_clip.clip.utils import image_transform

    image = noisy_image(150, 90)
    ours = eval_transform(tiny_model, "squash")(image)
    assert ours.shape == (3, SIDE, SIDE)
    assert torch.equal(ours, image_transform(SIDE)(image))


def test_center_crop_is_open_clips_eval_transform(tiny_model):
    import open_clip

    image = noisy_image(150, 90)
    ours = eval_transform(tiny_model, "center_crop")(image)
    assert torch.equal(ours, open_clip.image_transform(SIDE, is_train=False)(image))
    assert torch.equal(eval_transform(tiny_model)(image), ours)  # the default
    assert not torch.allclose(ours, eval_transform(tiny_model, "squash")(image))


def test_a_square_image_is_the_same_under_both(tiny_model):
    image = noisy_image(SIDE * 2, SIDE * 2, seed=3)
    assert torch.allclose(eval_transform(tiny_model, "squash")(image), eval_transform(tiny_model, "center_crop")(image))


# --- a retrieval set whose pictures differ only at their left and right edges ----------------------

EDGE_COLOURS = {"红": (230, 20, 20), "绿": (20, 200, 40), "蓝": (30, 40, 230), "黄": (235, 220, 30),
                "青": (20, 210, 210), "紫": (200, 30, 200)}
GREY = 128
MEAN = torch.tensor((0.48145466, 0.4578275, 0.40821073))
STD = torch.tensor((0.26862954, 0.26130258, 0.27577711))


def edge_picture(colour: tuple[int, int, int]) -> bytes:
    """300×100: a grey middle third (what a center crop keeps) between two coloured edge bands."""
    image = Image.new("RGB", (300, 100), colour)
    image.paste((GREY, GREY, GREY), (80, 0, 220, 100))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


class ColourReader(torch.nn.Module):
    """A stand-in CLIP that sees only colour: an image's embedding is its mean normalized pixel
    minus that of plain grey; a caption's is its colour's direction in the same space. What it can
    tell apart is exactly what the transform leaves in the picture."""

    def __init__(self):
        super().__init__()
        self.grey = (GREY / 255 - MEAN) / STD

    def encode_image(self, images, normalize=True):
        feats = images.mean(dim=(2, 3)) - self.grey
        return torch.nn.functional.normalize(feats, dim=1) if normalize else feats

    def encode_text(self, directions, normalize=True):
        return torch.nn.functional.normalize(directions, dim=1)


def colour_tokenizer(texts):
    return torch.stack([(torch.tensor(EDGE_COLOURS[t[0]], dtype=torch.float) - GREY) / 255 / STD for t in texts])


@pytest.fixture(scope="module")
def edge_set(tmp_path_factory):
    path = tmp_path_factory.mktemp("edges") / "0.tar"
    with wds.TarWriter(str(path)) as writer:
        for i, name in enumerate(EDGE_COLOURS):
            writer.write({"__key__": f"e{i}", "png": edge_picture(EDGE_COLOURS[name]),
                          "txt": f"{name}色边框的灰色图片".encode()})
    return str(path)


def test_retrieval_on_edge_content_depends_on_the_resize(edge_set, tiny_model):
    eval_set = EvalSet(name="edges", data=edge_set)
    metrics = {resize: evaluate_set(ColourReader(), colour_tokenizer, eval_set, eval_transform(tiny_model, resize),
                                    device=torch.device("cpu"))
               for resize in ("squash", "center_crop")}
    # Squashed, every picture keeps its coloured edges: each caption finds its own image first.
    assert metrics["squash"]["text_to_image_R@1"] == metrics["squash"]["image_to_text_R@1"] == 100.0
    # Center-cropped, all six are the same grey square: at most one of six ties resolves right.
    assert metrics["center_crop"]["text_to_image_R@1"] <= 100 / 6 + 1e-6
    assert metrics["center_crop"]["mean_recall"] < metrics["squash"]["mean_recall"]


def test_resize_in_a_training_config(tmp_path):
    base = {"output_dir": str(tmp_path), "model": "cn-tiny", "data": {"train": "x.tar"}, "batch_size": 2,
            "stage1": {"steps": 1, "lr": 1e-3}, "stage2": {"steps": 1, "lr": 1e-3}}
    cfg = parse_config({**base, "eval": {"resize": "squash", "sets": [
        {"name": "a", "data": "a.tar"}, {"name": "b", "data": "b.tar", "resize": "center_crop"}]}}, "cfg.yaml")
    assert [cfg.eval.resize_for(s) for s in cfg.eval.sets] == ["squash", "center_crop"]
    default = parse_config({**base, "eval": {"sets": [{"name": "a", "data": "a.tar"}]}}, "cfg.yaml")
    assert default.eval.resize_for(default.eval.sets[0]) == "center_crop"
    from cnclip.train.config import ConfigError

    with pytest.raises(ConfigError, match=r"^cfg.yaml: eval.sets\[0\].resize: Input should be 'squash' or "
                                          r"'center_crop'"):
        parse_config({**base, "eval": {"sets": [{"name": "a", "data": "a.tar", "resize": "crop"}]}}, "cfg.yaml")


def test_cli_refuses_an_unknown_resize(tmp_path):
    from typer.testing import CliRunner

    from cnclip.train.cli import app

    result = CliRunner().invoke(app, ["eval", str(tmp_path / "x.pt"), "--data", "x.tar", "--resize", "crop"])
    assert result.exit_code == 2
    assert result.output.strip().splitlines()[-1].endswith("--resize: center_crop or squash (got 'crop')")
