"""The zoo builds on open_clip; initial weights load from local files the tests write."""

import json

import pytest
import torch
from torch import nn

import test_train_support  # noqa: F401  (one thread, quiet)
from cnclip.train.models import (
    ModelError,
    create_model,
    get_model_config,
    list_models,
    load_clip_weights,
    load_image_tower,
    parameter_count,
)
from embed_models import tiny_chinese_clip

# Chinese-CLIP's published sizes (README of OFA-Sys/Chinese-CLIP): 77M, 188M, 406M, 407M, 958M.
PAPER_SIZES = {"cn-RN50": 77.0e6, "cn-ViT-B-16": 188.3e6, "cn-ViT-L-14": 406.2e6, "cn-ViT-L-14-336": 406.6e6,
               "cn-ViT-H-14": 957.6e6}


@pytest.mark.parametrize("name", sorted(PAPER_SIZES))
def test_paper_sizes(name, tmp_path):
    with torch.device("meta"):  # shapes only: no memory, no time
        model, cfg = create_model(name, vocab_size=21128, workdir=tmp_path, device="meta")
    counts = parameter_count(model)
    assert abs(counts["total"] - PAPER_SIZES[name]) / PAPER_SIZES[name] < 0.002
    # Chinese-CLIP's text architecture: BERT, [CLS] last hidden state, bias-free linear projection.
    assert type(model.text.pooler).__name__ == "ClsLastHiddenStatePooler"
    assert isinstance(model.text.proj, nn.Linear) and model.text.proj.bias is None
    assert model.text.transformer.config.vocab_size == 21128 and cfg["text_cfg"]["context_length"] == 52
    assert model.text.transformer.config._attn_implementation == "sdpa"


def test_zoo_lists_paper_and_tiny_models():
    assert set(PAPER_SIZES) | {"cn-tiny", "cn-tiny-rn"} <= set(list_models())
    with pytest.raises(ModelError, match="unknown model 'ViT-Q-99'"):
        create_model("ViT-Q-99", vocab_size=10, workdir="/tmp")


def tiny_bert_dir(path, vocab, hidden=64):
    """A Chinese-RoBERTa-like HF directory: config.json + weights + vocab.txt."""
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=128, max_position_embeddings=64, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    torch.manual_seed(123)
    bert = BertModel(config, add_pooling_layer=False)
    bert.save_pretrained(path)
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    return bert


VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [chr(0x4E00 + i) for i in range(95)]


def test_text_tower_from_hf_directory(tmp_path):
    bert = tiny_bert_dir(tmp_path / "roberta", VOCAB)
    model, cfg = create_model("cn-tiny", vocab_size=len(VOCAB), workdir=tmp_path / "w", text_init=tmp_path / "roberta")
    loaded = model.text.transformer.state_dict()
    for key, value in bert.state_dict().items():
        assert torch.equal(loaded[key], value), key
    assert cfg["text_cfg"]["hf_model_name"] == str((tmp_path / "roberta").resolve())
    with pytest.raises(ModelError, match="vocab_size 100 differs from the tokenizer's 21128"):
        create_model("cn-tiny", vocab_size=21128, workdir=tmp_path / "w", text_init=tmp_path / "roberta")
    tiny_bert_dir(tmp_path / "wide", VOCAB, hidden=32)
    with pytest.raises(ModelError, match="hidden_size 32 differs from the model config's 64"):
        create_model("cn-tiny", vocab_size=len(VOCAB), workdir=tmp_path / "w", text_init=tmp_path / "wide")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_text_tower_saved_in_half_precision_loads_in_float32(tmp_path, dtype):
    bert = tiny_bert_dir(tmp_path / "roberta", VOCAB)
    bert.to(dtype).save_pretrained(tmp_path / "roberta")  # re-saved in half precision, as hub conversions often are
    model, _ = create_model("cn-tiny", vocab_size=len(VOCAB), workdir=tmp_path / "w", text_init=tmp_path / "roberta")
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    loaded = model.text.transformer.state_dict()
    for key, value in bert.state_dict().items():
        assert torch.equal(loaded[key], value.float()), key  # fp16/bf16 -> fp32 is exact
    texts = torch.zeros(2, 52, dtype=torch.long)
    texts[:, 0], texts[:, 1], texts[:, 2] = 2, 7, 3
    image, text, scale = model(torch.randn(2, 3, 64, 64), texts)[:3]  # the first forward used to fail
    assert text.dtype == torch.float32 and torch.isfinite(text).all()


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore::FutureWarning")
@pytest.mark.parametrize("fmt", ["open_clip_train", "safetensors", "openai_torchscript"])
def test_image_tower_from_checkpoint(tmp_path, fmt):
    torch.manual_seed(1)
    source, _ = create_model("cn-tiny", vocab_size=50, workdir=tmp_path)
    path = tmp_path / "image.pt"
    if fmt == "open_clip_train":  # what open_clip_train writes: a dict with a DDP-prefixed state_dict
        torch.save({"epoch": 3, "state_dict": {"module." + k: v for k, v in source.state_dict().items()}}, path)
    elif fmt == "safetensors":
        from safetensors.torch import save_file

        path = tmp_path / "image.safetensors"
        save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    else:  # OpenAI's released CLIP files are TorchScript archives holding `visual.*`
        class Wrapper(nn.Module):
            def __init__(self, visual):
                super().__init__()
                self.visual = visual

            def forward(self, x):
                return self.visual(x)

        torch.jit.trace(Wrapper(source.visual).eval(), torch.randn(1, 3, 64, 64), check_trace=False).save(str(path))
    torch.manual_seed(2)
    target, _ = create_model("cn-tiny", vocab_size=50, workdir=tmp_path)
    assert not torch.equal(target.visual.conv1.weight, source.visual.conv1.weight)
    text_before = {k: v.clone() for k, v in target.text.state_dict().items()}
    load_image_tower(target, path)
    for (key, a), b in zip(source.visual.state_dict().items(), target.visual.state_dict().values(), strict=True):
        assert torch.equal(a, b), key
    assert all(torch.equal(v, target.text.state_dict()[k]) for k, v in text_before.items())  # text untouched


def test_image_tower_mismatch_is_an_error(tmp_path):
    other, _ = create_model("cn-tiny-rn", vocab_size=50, workdir=tmp_path)
    torch.save(other.state_dict(), tmp_path / "rn.pt")
    model, _ = create_model("cn-tiny", vocab_size=50, workdir=tmp_path)
    with pytest.raises(ModelError, match="image tower does not match the model"):
        load_image_tower(model, tmp_path / "rn.pt")
    # A ResNet tower trained at another image size: open_clip resizes only ViT position embeddings.
    rn96 = {**get_model_config("cn-tiny-rn"), "vision_cfg": {**get_model_config("cn-tiny-rn")["vision_cfg"],
                                                              "image_size": 96}}
    (tmp_path / "rn96.json").write_text(json.dumps(rn96))
    big, _ = create_model(str(tmp_path / "rn96.json"), vocab_size=50, workdir=tmp_path)
    torch.save(big.state_dict(), tmp_path / "rn96.pt")
    with pytest.raises(ModelError, match="ResNet image tower was trained at 96 px and the model uses 64 px"):
        load_image_tower(other, tmp_path / "rn96.pt")
    with pytest.raises(ModelError, match="ResNet image tower was trained at 96 px"):
        load_clip_weights(other, tmp_path / "rn96.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match="junk.pt: cannot read checkpoint"):
        load_image_tower(model, tmp_path / "junk.pt")


def test_chinese_clip_checkpoint_gives_identical_embeddings(tmp_path):
    """A Chinese-CLIP (cn_clip) training checkpoint loads into the zoo model: same embeddings."""
    pytest.importorskip("cn_clip.clip.model")
    vocab_size = 300
    # cn_clip's training script saves {"epoch", "step", "state_dict": {"module.…"}}.
    _, reference = tiny_chinese_clip(tmp_path / "epoch1.pt", vocab_size)
    model, _ = create_model("cn-tiny", vocab_size=vocab_size, workdir=tmp_path)
    load_clip_weights(model, tmp_path / "epoch1.pt")
    model.eval()
    images = torch.randn(3, 3, 64, 64)
    texts = torch.randint(105, vocab_size, (3, 52))
    texts[:, 0], texts[:, 19], texts[:, 20:] = 101, 102, 0
    with torch.no_grad():
        assert torch.allclose(model.encode_image(images), reference.encode_image(images), atol=1e-5)
        assert torch.allclose(model.encode_text(texts), reference.encode_text(texts), atol=1e-5)
        assert model.logit_scale.item() == pytest.approx(reference.logit_scale.item())


def test_plain_open_clip_config_file(tmp_path):
    """`model:` may name any open_clip config file, e.g. one with a native text tower."""
    cfg = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
           "text_cfg": {"context_length": 52, "vocab_size": 120, "width": 32, "heads": 2, "layers": 1,
                        "pool_type": "eos", "eos_id": 102, "pad_id": 0}}
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(cfg))
    model, resolved = create_model(str(path), vocab_size=120, workdir=tmp_path)
    assert type(model).__name__ == "CLIP" and model.encode_text(torch.zeros(2, 52, dtype=torch.long)).shape == (2, 32)
