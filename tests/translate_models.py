"""A tiny English->Chinese seq2seq model made by the test, no download: a Marian config with random
weights and a word-level tokenizer built with the `tokenizers` library, saved as a
PreTrainedTokenizerFast, so the hf and ctranslate2 backends load real model folders."""

from __future__ import annotations

from pathlib import Path

WORDS = ["a", "red", "green", "blue", "square", "circle", "triangle", "on", "white", "background",
         "红", "绿", "蓝", "色", "方", "形", "圆", "三", "角"]
TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json"]


def tiny_marian(folder: Path, seed: int = 0) -> Path:
    """A Marian model (1 encoder and 1 decoder layer, width 16) and its tokenizer in `folder`."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import MarianConfig, MarianMTModel, PreTrainedTokenizerFast

    # Marian's own layout: <pad> last (CTranslate2's converter drops it, starting the decoder from a
    # zero embedding instead).
    vocab = {token: index for index, token in enumerate(["</s>", "<unk>", *WORDS, "<pad>"])}
    pad = len(vocab) - 1
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 0)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>",
                                   unk_token="<unk>")
    config = MarianConfig(vocab_size=len(vocab), d_model=16, encoder_layers=1, decoder_layers=1,
                          encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
                          decoder_ffn_dim=32, max_position_embeddings=64, pad_token_id=pad, eos_token_id=0,
                          decoder_start_token_id=pad, forced_eos_token_id=0, scale_embedding=True)
    torch.manual_seed(seed)
    model = MarianMTModel(config).eval()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


def converted(model: Path, folder: Path) -> Path:
    """The model converted for CTranslate2, its tokenizer files copied beside it."""
    from ctranslate2.converters import TransformersConverter

    copy = [name for name in TOKENIZER_FILES if (model / name).exists()]
    TransformersConverter(str(model), copy_files=copy).convert(str(folder), force=True)
    return folder
