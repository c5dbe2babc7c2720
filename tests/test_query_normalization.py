"""Texts given to a model are normalized as captions are: in cnclip's tokenizer and in the export's."""

import multiprocessing

import numpy as np
import open_clip
import polars as pl
import pytest
import torch
from typer.testing import CliRunner

from cnclip.corpus.ops.normalize import normalize_captions, normalize_texts
from cnclip.embed.encoder import load_encoder
from cnclip.train.cli import app
from cnclip.train.export import open_clip_kwargs
from cnclip.train.factory import load_model_from_checkpoint
from cnclip.train.loop import train
from cnclip.train.tokenizer import BERT_BASE_CHINESE_VOCAB, ChineseTokenizer
from test_train_support import shape_shards, tiny_config  # noqa: F401
from test_train_tokenizer import varied_captions

RAW, CLEAN = "２０２３年ＮＢＡ總決賽", "2023年NBA总决赛"
# Same text once more with what a copy-paste carries: a zero-width space, a BOM, a soft hyphen, a tab.
DIRTY = "\ufeff２０２３年\u200bＮＢＡ\u00ad總決賽\t"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, shape_shards):  # noqa: F811 (the fixture imported above)
    root = tmp_path_factory.mktemp("normalized")
    cfg = tiny_config(root, shape_shards, tokenizer={"vocab": "bert-base-chinese"},
                      stage1={"steps": 2}, stage2={"steps": 2})
    train(cfg)
    return root / "run" / "checkpoints" / "stage2-final.pt"


def test_the_query_normalization_is_the_caption_normalization():
    assert normalize_texts([RAW, DIRTY, "  一個&amp;紅色的圓形  "]) == [CLEAN, CLEAN, "一个&红色的圆形"]
    assert normalize_texts(normalize_texts([RAW])) == [CLEAN]
    assert normalize_texts([]) == []


def test_texts_are_normalized_exactly_as_the_corpus_normalizes_captions():
    texts = varied_captions(300, seed=3) + [RAW, DIRTY, "a\u034fb", "&lt;高清&gt;\u3000４Ｋ", "\x00\x1f", "", "  "]
    assert normalize_texts(texts) == normalize_captions(pl.Series(texts)).to_list()
    assert normalize_texts(texts, None) == normalize_captions(pl.Series(texts), None).to_list()


def _ids(text):
    return ChineseTokenizer.from_file(BERT_BASE_CHINESE_VOCAB, normalize=True)(text)[0].tolist()


def test_a_normalizing_tokenizer_works_in_a_forked_data_loader_worker():
    # polars' thread pool, started here, would deadlock a polars call in a forked child.
    assert pl.DataFrame({"a": list(range(10_000))}).group_by(pl.col("a") % 7).len().height == 7
    with multiprocessing.get_context("fork").Pool(1) as pool:
        assert pool.apply_async(_ids, (RAW,)).get(timeout=120) == _ids(CLEAN)


def test_a_normalizing_tokenizer_gives_the_clean_ids_and_a_raw_one_does_not():
    tok = ChineseTokenizer.from_file(BERT_BASE_CHINESE_VOCAB, normalize=True)
    ids = tok([RAW, CLEAN, DIRTY])
    assert torch.equal(ids[0], ids[1]) and torch.equal(ids[2], ids[1])
    assert 100 not in ids[1].tolist()  # [UNK]: every character of the clean text is in the vocab
    assert tok.tokenize(RAW) == tok.tokenize(CLEAN) == ["202", "##3", "年", "nba", "总", "决", "赛"]
    raw = ChineseTokenizer.from_file(BERT_BASE_CHINESE_VOCAB)  # cn_clip.clip.tokenize's ids of the raw text
    assert not torch.equal(raw(RAW)[0], raw(CLEAN)[0])


def test_cnclip_and_the_export_give_the_same_ids_and_embeddings_for_raw_and_clean(checkpoint, tmp_path):
    model, tokenizer, _ = load_model_from_checkpoint(checkpoint, tmp_path / "work")
    assert tokenizer.normalize
    ours = tokenizer([RAW, CLEAN, DIRTY])
    assert torch.equal(ours[0], ours[1]) and torch.equal(ours[2], ours[1])

    result = CliRunner().invoke(app, ["export", str(checkpoint), str(tmp_path / "exported")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "exported" / "tokenizer.json").is_file()
    exported_tokenizer = open_clip.get_tokenizer(f"local-dir:{tmp_path / 'exported'}")
    theirs = exported_tokenizer([RAW, CLEAN, DIRTY])
    assert torch.equal(theirs, ours)

    exported, _, _ = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'exported'}",
                                                           **open_clip_kwargs(tmp_path / "exported"))
    with torch.no_grad():
        exported_embeddings = exported.eval().encode_text(theirs, normalize=True).numpy()
    assert np.abs(exported_embeddings[0] - exported_embeddings[1]).max() <= 1e-6
    encoder = load_encoder(checkpoint, "cpu")  # what search embeds a query with
    embedded = encoder.encode_texts([RAW, CLEAN])
    assert np.abs(embedded[0] - embedded[1]).max() <= 1e-6
    assert np.abs(embedded - exported_embeddings[:2]).max() <= 1e-6
    # The clean text is not [UNK]s: another text embeds elsewhere.
    assert np.abs(encoder.encode_texts(["一只猫"])[0] - embedded[1]).max() > 1e-3
