import polars as pl
import pytest

from cnclip.corpus.ops.normalize import normalize_captions, normalize_phrases


def norm(*captions, config="t2s"):
    return normalize_captions(pl.Series(list(captions), dtype=pl.String), config).to_list()


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("２０２３年ＮＢＡ", "2023年NBA"),
        ("一隻貓", "一只猫"),
        ("鄧麗君的歌曲", "邓丽君的歌曲"),
        ("小狗&amp;小猫&nbsp;在玩", "小狗&小猫 在玩"),
        ("&lt;高清&gt; 风景", "<高清> 风景"),
        ("第一行\n第二行\t\t第三行", "第一行 第二行 第三行"),
        ("  前后空白　全角空格  ", "前后空白 全角空格"),
        ("零\u200b宽\ufeff字符", "零宽字符"),
        ("控制\x07字符\x1b", "控制 字符"),
        ("&#34;引号&#34;", '"引号"'),
    ],
)
def test_normalization_rules(raw, expected):
    assert norm(raw) == [expected]


def test_raw_caption_untouched_and_nulls_become_empty():
    raw = pl.Series(["一隻貓", None], dtype=pl.String)
    assert normalize_captions(raw).to_list() == ["一只猫", ""]
    assert raw.to_list() == ["一隻貓", None]


def test_batch_separators_cannot_shift_captions():
    # Entities that decode to the separators used for batching must not merge or split rows.
    raw = ["a&#1;b", "c\x01d", "e&#10;f", "g\nh", "正常", "&amp;"]
    assert norm(*raw) == ["ab", "c d", "e f", "g h", "正常", "&"]


def test_large_batch_keeps_row_alignment():
    raw = [f"第{i}隻貓&amp;狗" for i in range(120_000)]
    out = norm(*raw)
    assert len(out) == len(raw)
    assert out[0] == "第0只猫&狗" and out[-1] == "第119999只猫&狗"


def test_opencc_can_be_switched_off_or_changed():
    assert norm("一隻貓", config=None) == ["一隻貓"]
    assert norm("軟體", config="tw2sp") == ["软件"]


def test_phrases_are_normalized_like_captions():
    assert normalize_phrases(["點擊查看大圖", "  ", "点击查看大图"]) == ["点击查看大图"]


def test_every_invisible_format_character_is_removed():
    # An attacker hides text direction tricks and tag characters in captions; none may survive.
    import sys
    import unicodedata

    cf = [chr(c) for c in range(sys.maxunicode + 1) if unicodedata.category(chr(c)) == "Cf"]
    hidden = "".join(cf) + "\u034f"
    out = norm("一只" + hidden + "小猫", "前\u2066后\u2069\u00ad字\U000E0041\U000E007F\u180e\ufff9注\ufffb", config=None)
    assert out == ["一只小猫", "前后字注"]


def test_replacement_character_is_kept_for_the_filters():
    # U+FFFD is damage, not formatting: normalization keeps it so the text stage can reject it.
    assert norm("损坏的\ufffd标题") == ["损坏的\ufffd标题"]
