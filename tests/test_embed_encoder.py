"""Every kind of model the embed stage takes loads into an Encoder whose embeddings are the
model's own encode_* output, normalized."""

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from cnclip.embed.encoder import EncoderError, load_encoder
from cnclip.train.export import open_clip_kwargs
from embed_models import tiny_chinese_clip, tiny_cnclip_checkpoint, tiny_local_dir

CAPTIONS = ["红色的圆形", "一个蓝色的方形", "绿色三角"]


def _images():
    return [Image.new("RGB", (80, 70), c) for c in [(200, 30, 30), (30, 200, 30), (30, 30, 200)]]


def _unit(x: torch.Tensor) -> np.ndarray:
    x = x.float()
    return (x / x.norm(dim=-1, keepdim=True)).numpy()


def test_cnclip_checkpoint(tmp_path):
    from cnclip.train.factory import load_model_from_checkpoint

    path = tiny_cnclip_checkpoint(tmp_path / "tiny.pt")
    encoder = load_encoder(path, "cpu")
    model, tokenizer, _ = load_model_from_checkpoint(path, tmp_path / "w")
    with torch.no_grad():
        expected = _unit(model.encode_text(tokenizer(CAPTIONS)))
    assert np.allclose(encoder.encode_texts(CAPTIONS), expected, atol=1e-5)
    assert encoder.dim == 64 and encoder.name == f"cnclip-checkpoint:{path}"


def test_local_dir_export_and_prefix(tmp_path):
    folder = tiny_local_dir(tmp_path / "exported")
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}", **open_clip_kwargs(folder))
    tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
    model.eval()
    for given in (folder, f"local-dir:{folder}"):
        encoder = load_encoder(given, "cpu")
        with torch.no_grad():
            texts = _unit(model.encode_text(tokenizer(CAPTIONS)))
            images = _unit(model.encode_image(torch.stack([preprocess(im) for im in _images()])))
        assert np.allclose(encoder.encode_texts(CAPTIONS), texts, atol=1e-5)
        assert np.allclose(encoder.encode_images(_images()), images, atol=1e-5)
        assert encoder.name == f"local-dir:{folder}"


def test_chinese_clip_checkpoint_architecture_told_from_its_shapes(tmp_path):
    pytest.importorskip("cn_clip.clip.model")
    path, reference = tiny_chinese_clip(tmp_path / "epoch1.pt")
    encoder = load_encoder(path, "cpu")
    assert encoder.name.endswith("(cn-tiny)")
    pixels = torch.stack([encoder.transform(im) for im in _images()])
    tokens = encoder.tokenizer(CAPTIONS)
    with torch.no_grad():
        assert np.allclose(encoder.encode_pixels(pixels), _unit(reference.encode_image(pixels)), atol=1e-5)
        assert np.allclose(encoder.encode_texts(CAPTIONS), _unit(reference.encode_text(tokens)), atol=1e-5)
    # the same, named explicitly
    assert load_encoder(path, "cpu", architecture="cn-tiny").dim == 64


def test_chinese_clip_of_unknown_shapes_asks_for_the_architecture(tmp_path):
    pytest.importorskip("cn_clip.clip.model")
    path, reference = tiny_chinese_clip(tmp_path / "odd.pt")
    state = {"module." + k: v for k, v in reference.state_dict().items() if not k.startswith("bert.encoder.layer.1.")}
    torch.save({"state_dict": state}, path)
    with pytest.raises(EncoderError) as err:
        load_encoder(path, "cpu")
    assert str(err.value) == (f"{path}: cannot tell the Chinese-CLIP architecture from the checkpoint (no zoo model "
                              "matches its shapes); name it (embed.architecture: a zoo name or an open_clip config file)")
    with pytest.raises(EncoderError, match="odd.pt: checkpoint does not match the model"):
        load_encoder(path, "cpu", architecture="cn-tiny")


def test_what_is_no_model_is_one_line(tmp_path):
    (tmp_path / "notes.pt").write_bytes(b"not a checkpoint")
    (tmp_path / "folder").mkdir()
    for path in (tmp_path / "notes.pt", tmp_path / "folder"):
        with pytest.raises(EncoderError, match=r"not a model cnclip can load \(a cnclip checkpoint"):
            load_encoder(path, "cpu")
    with pytest.raises(EncoderError, match="missing.pt: no such model file or folder"):
        load_encoder(tmp_path / "missing.pt")
