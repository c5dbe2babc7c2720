"""`cnclip export --format cn_clip` writes a checkpoint cn_clip 1.6's own model classes load with the
model's embeddings; a cn_clip checkpoint goes through cnclip and back unchanged; what cn_clip
cannot express is refused in one line."""

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from cnclip.cli import app
from cnclip.train.checkpoint import save_checkpoint
from cnclip.train.cn_clip_checkpoint import (
    CN_CLIP_TEXT,
    CN_CLIP_VISION,
    CnClipExportError,
    cn_clip_structure,
    write_cn_clip_checkpoint,
)
from cnclip.train.models import create_model, get_model_config
from cnclip.train.tokenizer import BERT_BASE_CHINESE_VOCAB, read_vocab
from embed_models import tiny_cnclip_checkpoint

cn_clip = pytest.importorskip("cn_clip.clip")
from cn_clip.clip.model import CLIP  # noqa: E402
from cn_clip.clip.utils import image_transform, load_from_name  # noqa: E402

runner = CliRunner()
CONFIGS = Path(cn_clip.__path__[0]) / "model_configs"
CAPTIONS = ["一个红色的圆形", "画着蓝色方形的图片", "北京的秋天", "2023年NBA总决赛", "一只在草地上奔跑的小狗"]
BERT_VOCAB = read_vocab(BERT_BASE_CHINESE_VOCAB)


def _cn_clip_info(vision: str, text: str) -> dict:
    """CLIP's keyword arguments as cn_clip.clip.utils.create_model reads them from its config files."""
    info = json.loads((CONFIGS / f"{vision}.json").read_text())
    info.update(json.loads((CONFIGS / f"{text}.json").read_text()))
    if isinstance(info["vision_layers"], str):
        info["vision_layers"] = json.loads(info["vision_layers"])
    return info


def _cn_clip_model(vision: str, text: str, path: Path) -> CLIP:
    """cn_clip's CLIP built and loaded as its create_model does (`module.` stripped, bert.pooler
    dropped, a strict load_state_dict), kept in fp32 (create_model's convert_weights would cast to
    fp16 first, which `load_from_name` below exercises)."""
    model = CLIP(**_cn_clip_info(vision, text))
    sd = torch.load(path, map_location="cpu")["state_dict"]
    model.load_state_dict({k[len("module."):]: v for k, v in sd.items() if "bert.pooler" not in k})
    return model.eval()


def _images() -> list[Image.Image]:
    return [Image.new("RGB", (300, 200), (200, 30, 30)), Image.new("RGB", (180, 240), (30, 160, 220)),
            Image.radial_gradient("L").convert("RGB")]


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Perturb every weight and BatchNorm statistic, so no part of the mapping hides behind an init
    that zeroes it (open_clip zeroes each residual block's last BatchNorm scale)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.02)
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1, generator=gen)
                m.running_var.uniform_(0.5, 1.5, generator=gen)


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def test_the_tables_are_cn_clips_own_configs():
    for name, config in CN_CLIP_VISION.items():
        found = json.loads((CONFIGS / f"{name}.json").read_text())
        if isinstance(found["vision_layers"], str):
            found["vision_layers"] = json.loads(found["vision_layers"])
        assert found == config, name
    for name, config in CN_CLIP_TEXT.items():
        assert json.loads((CONFIGS / f"{name}.json").read_text()) == config, name
    assert {p.stem for p in CONFIGS.glob("*.json")} == set(CN_CLIP_VISION) | set(CN_CLIP_TEXT)
    assert read_vocab(Path(cn_clip.__path__[0]) / "vocab.txt") == BERT_VOCAB


@pytest.mark.parametrize("zoo, structure", [
    ("cn-RN50", "RN50@RBT3-chinese"), ("cn-ViT-B-16", "ViT-B-16@RoBERTa-wwm-ext-base-chinese"),
    ("cn-ViT-L-14", "ViT-L-14@RoBERTa-wwm-ext-base-chinese"),
    ("cn-ViT-L-14-336", "ViT-L-14-336@RoBERTa-wwm-ext-base-chinese")])
def test_zoo_models_map_to_cn_clip_structures(zoo, structure):
    assert cn_clip_structure(get_model_config(zoo), BERT_VOCAB).name == structure


@pytest.mark.parametrize("change, message", [
    (lambda c: c.update(quick_gelu=False), "cn_clip's ViT towers use QuickGELU; this model's uses GELU (quick_gelu: false)"),
    (lambda c: c["vision_cfg"].update(image_size=288),
     "cn_clip has no image tower config of this model's shape (embed_dim 512, image_resolution 288, layers 12, "
     "width 768, patch_size 16); its configs: RN50, ViT-B-16, ViT-B-32, ViT-L-14, ViT-L-14-336, ViT-H-14"),
    (lambda c: c["hf_text_config"].update(num_hidden_layers=6),
     "cn_clip has no text tower config of this model's shape (vocab_size 21128, hidden_act gelu, hidden_size 768, "
     "intermediate_size 3072, max_position_embeddings 512, num_attention_heads 12, num_hidden_layers 6, "
     "type_vocab_size 2); its configs: RBT3-chinese, RoBERTa-wwm-ext-base-chinese, RoBERTa-wwm-ext-large-chinese"),
    (lambda c: c["text_cfg"].update(hf_pooler_type="cls_pooler"),
     "cn_clip reads the text tower's [CLS] state through a bias-free linear projection; this model has "
     "text_cfg.hf_pooler_type 'cls_pooler'"),
    (lambda c: c.update(init_logit_bias=-10), "cn_clip's CLIP has no logit bias; this model has one (init_logit_bias)"),
])
def test_what_cn_clip_cannot_express_is_named(change, message):
    cfg = get_model_config("cn-ViT-B-16")
    change(cfg)
    with pytest.raises(CnClipExportError) as err:
        cn_clip_structure(cfg, BERT_VOCAB)
    assert str(err.value) == message


def test_the_zoo_vit_h_uses_gelu_which_cn_clip_lacks():
    with pytest.raises(CnClipExportError, match=r"QuickGELU; this model's uses GELU"):
        cn_clip_structure(get_model_config("cn-ViT-H-14"), BERT_VOCAB)


def test_another_vocabulary_is_refused():
    with pytest.raises(CnClipExportError) as err:
        cn_clip_structure(get_model_config("cn-RN50"), BERT_VOCAB[:-1] + ["[unused9999]"])
    assert str(err.value) == ("cn_clip's tokenizer reads only its own vocab.txt (bert-base-chinese's 21,128 tokens); "
                              "this model's vocabulary (21128 tokens) is another")


def test_a_zoo_model_without_a_cn_clip_config_is_one_line_and_writes_nothing(tmp_path):
    checkpoint = tiny_cnclip_checkpoint(tmp_path / "tiny.pt")
    out = tmp_path / "out" / "tiny-cn_clip.pt"
    result = runner.invoke(app, ["export", str(checkpoint), str(out), "--format", "cn_clip"])
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert result.exit_code == 2 and lines == [
        f"error: cannot export {checkpoint} as a cn_clip checkpoint: cn_clip has no image tower config of this "
        "model's shape (embed_dim 64, image_resolution 64, layers 2, width 64, patch_size 16); its configs: RN50, "
        "ViT-B-16, ViT-B-32, ViT-L-14, ViT-L-14-336, ViT-H-14"], result.output
    assert not out.parent.exists()
    bad = runner.invoke(app, ["export", str(checkpoint), str(out), "--format", "onnx"])
    assert bad.exit_code == 2 and "--format: open_clip or cn_clip (got 'onnx')" in bad.output


@pytest.fixture(scope="module")
def rn50(tmp_path_factory):
    """cnclip's zoo cn-RN50 at random weights, as a `cnclip train` checkpoint, and that model."""
    root = tmp_path_factory.mktemp("rn50")
    torch.manual_seed(0)
    model, model_cfg = create_model("cn-RN50", vocab_size=len(BERT_VOCAB), workdir=root / "work")
    _randomize(model, seed=1)
    path = save_checkpoint(root / "stage2-final.pt", {
        "model": model.state_dict(), "model_cfg": json.dumps(model_cfg), "vocab": "\n".join(BERT_VOCAB) + "\n",
        "context_length": 52, "stage": 2, "step": 7, "stage_complete": True})
    return path, model.eval()


def test_rn50_cn_clip_export_loads_in_cn_clip_with_identical_embeddings(rn50, tmp_path):
    checkpoint, model = rn50
    out = tmp_path / "rn50-cn_clip.pt"
    result = runner.invoke(app, ["export", str(checkpoint), str(out), "--format", "cn_clip"])
    assert result.exit_code == 0, result.output
    assert "cn_clip RN50@RBT3-chinese" in result.output and "--model-arch RN50" in result.output
    saved = torch.load(out, map_location="cpu")
    assert (saved["epoch"], saved["step"], saved["name"]) == (0, 7, "stage2-final")
    assert all(k.startswith("module.") for k in saved["state_dict"])

    reference = _cn_clip_model("RN50", "RBT3-chinese", out)
    pixels = torch.stack([image_transform(224)(im) for im in _images()])
    tokens = cn_clip.tokenize(CAPTIONS)
    with torch.no_grad():
        ours_image, ours_text = model.encode_image(pixels, normalize=True), model.encode_text(tokens, normalize=True)
        assert torch.allclose(_unit(reference.encode_image(pixels)), ours_image, atol=1e-4)
        assert torch.allclose(_unit(reference.encode_text(tokens)), ours_text, atol=1e-4)
        # cn_clip's own loader takes the file too (it casts the weights to fp16 first, hence the bound)
        loaded, _ = load_from_name(str(out), device="cpu", vision_model_name="RN50", text_model_name="RBT3-chinese",
                                   input_resolution=224)
        assert (_unit(loaded.eval().encode_text(tokens)) * ours_text).sum(-1).min() > 0.999
        assert (_unit(loaded.encode_image(pixels)) * ours_image).sum(-1).min() > 0.999


def test_cn_clip_checkpoint_round_trips_through_cnclip(tmp_path):
    torch.manual_seed(3)
    original = CLIP(**_cn_clip_info("RN50", "RBT3-chinese"))
    _randomize(original, seed=4)
    state = {"module." + k: v for k, v in original.state_dict().items()}
    torch.save({"epoch": 2, "step": 120, "name": "muge_finetune", "state_dict": state}, tmp_path / "epoch2.pt")
    result = runner.invoke(app, ["export", str(tmp_path / "epoch2.pt"), str(tmp_path / "again.pt"), "--format", "cn_clip"])
    assert result.exit_code == 0, result.output
    again = torch.load(tmp_path / "again.pt", map_location="cpu")
    assert (again["epoch"], again["step"]) == (2, 120)
    assert set(again["state_dict"]) == set(state)
    assert all(torch.equal(again["state_dict"][k], v) for k, v in state.items())


@pytest.mark.slow  # a 188M-parameter model built twice: ~40 s on 2 cores
def test_a_vit_exports_too(tmp_path):
    torch.manual_seed(5)
    model, model_cfg = create_model("cn-ViT-B-16", vocab_size=len(BERT_VOCAB), workdir=tmp_path / "work")
    _randomize(model, seed=6)
    out = tmp_path / "vit.pt"
    assert write_cn_clip_checkpoint(model, model_cfg, BERT_VOCAB, out).name == "ViT-B-16@RoBERTa-wwm-ext-base-chinese"
    reference = _cn_clip_model("ViT-B-16", "RoBERTa-wwm-ext-base-chinese", out)
    pixels = torch.stack([image_transform(224)(im) for im in _images()[:2]])
    tokens = cn_clip.tokenize(CAPTIONS[:3])
    with torch.no_grad():
        assert torch.allclose(_unit(reference.encode_image(pixels)), model.eval().encode_image(pixels, normalize=True),
                              atol=1e-4)
        assert torch.allclose(_unit(reference.encode_text(tokens)), model.encode_text(tokens, normalize=True), atol=1e-4)


def test_a_folder_is_no_checkpoint_file(rn50, tmp_path):
    checkpoint, _ = rn50
    (tmp_path / "exported").mkdir()
    result = runner.invoke(app, ["export", str(checkpoint), str(tmp_path / "exported"), "--format", "cn_clip"])
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert result.exit_code == 2 and lines == [
        f"error: cannot export {checkpoint} as a cn_clip checkpoint: {tmp_path / 'exported'}: a folder; --format "
        f"cn_clip writes one checkpoint file (e.g. {tmp_path / 'exported'}/model.pt)"]
    assert list((tmp_path / "exported").iterdir()) == []
    before = checkpoint.read_bytes()
    (tmp_path / "link.pt").symlink_to(checkpoint)  # another name of the same file
    same = runner.invoke(app, ["export", str(checkpoint), str(tmp_path / "link.pt"), "--format", "cn_clip"])
    assert same.exit_code == 2 and [ln for ln in same.output.splitlines() if ln.strip()] == [
        f"error: cannot export {checkpoint} as a cn_clip checkpoint: {tmp_path / 'link.pt'} is that checkpoint "
        "itself; name another file"]
    assert checkpoint.read_bytes() == before
