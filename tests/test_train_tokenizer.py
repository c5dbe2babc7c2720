"""The tokenizer reproduces cn_clip.clip.tokenize id for id; corpus vocabularies cover the corpus."""

import random

import pytest
import torch

from cnclip.train.tokenizer import BERT_BASE_CHINESE_VOCAB, ChineseTokenizer, build_corpus_vocab, read_vocab

cn_clip = pytest.importorskip("cn_clip.clip")

SUBJECTS = ["一只橘猫", "两只小狗", "穿红裙子的女孩", "故宫的角楼", "西湖断桥", "一碗兰州拉面", "熊猫宝宝", "高铁列车",
            "上海外滩夜景", "一杯拿铁咖啡", "iPhone15 Pro手机壳", "NBA球星库里", "一個穿綠色衣服的男孩", "北京烤鸭"]
PLACES = ["在草地上", "在雪地里", "在海边", "在咖啡馆里", "在城市街头", "在山顶上", "在厨房里", ""]
ACTIONS = ["奔跑", "睡觉", "微笑", "发光", "吃东西", "被拍下", "看着镜头", ""]
EXTRAS = ["", "，高清壁纸", "！", "？", "（2023年）", " 4K HD", "…", "——摄影作品", "【包邮】", " #旅行# @小红书",
          " http://t.cn/A6xyz", "，价格￥199.00", "　全角空格", "：Café naïve", " ＡＢＣ１２３", " 😀🎉", "；第3期",
          "，尺寸30×40cm", " Supercalifragilisticexpialidocious", "\t制表符", " O'Reilly出版社", " e.g.例如"]


def varied_captions(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        text = rng.choice(SUBJECTS) + rng.choice(PLACES) + rng.choice(ACTIONS) + rng.choice(EXTRAS)
        if rng.random() < 0.1:
            text = text * rng.randint(2, 4)  # longer than 52 tokens: truncation
        if rng.random() < 0.05:
            text += " " + "x" * rng.choice([99, 101, 150, 199, 201, 260])  # over WordPiece's per-word cap
        out.append(text)
    return out


def test_ids_equal_cn_clip_on_hundreds_of_captions():
    captions = varied_captions(400)
    ours = ChineseTokenizer.from_file(BERT_BASE_CHINESE_VOCAB)(captions)
    reference = cn_clip.tokenize(captions, context_length=52)
    assert ours.shape == reference.shape == (400, 52)
    mismatched = [c for c, a, b in zip(captions, ours, reference, strict=True) if not torch.equal(a, b)]
    assert mismatched == []
    # The captions really exercise the vocabulary: truncation, [UNK] and many distinct ids.
    assert (reference[:, -1] == 102).sum() > 10
    assert (reference == 100).any()
    assert reference.unique().numel() > 150


def test_conventions():
    tok = ChineseTokenizer.from_file(BERT_BASE_CHINESE_VOCAB)
    assert tok.vocab_size == 21128 and tok.context_length == 52
    assert (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id) == (0, 100, 101, 102)
    assert tok("一只猫")[0, :6].tolist() == [101, 671, 1372, 4344, 102, 0]
    assert torch.equal(tok("HELLO Café"), tok("hello cafe"))  # lowercased, accents stripped


def test_shipped_vocab_is_cn_clips(tmp_path):
    from pathlib import Path

    reference = Path(cn_clip.__file__).parent / "vocab.txt"
    assert read_vocab(BERT_BASE_CHINESE_VOCAB) == read_vocab(reference)


def test_corpus_vocab_covers_its_captions(tmp_path):
    captions = varied_captions(200, seed=1)
    vocab = build_corpus_vocab(captions)
    assert vocab[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = ChineseTokenizer(vocab)
    ids = tok(captions, context_length=128)
    long_word = {i for i, c in enumerate(captions) if "x" * 201 in c}
    covered = [i for i in range(len(captions)) if i not in long_word]
    assert not (ids[covered] == tok.unk_id).any()
    assert len(vocab) < 1000  # characters, not the 21,128-token vocab
    tok.save(tmp_path)
    assert read_vocab(tmp_path / "vocab.txt") == vocab
