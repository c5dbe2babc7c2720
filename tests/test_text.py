import glob

import polars as pl
import pytest

from cnclip.corpus import run_text
from cnclip.corpus.recipe import TextSettings
from cnclip.corpus.stages.text import cjk_ratio, load_blacklist, per_row_reason


def reasons(captions, urls=None, **settings):
    settings = TextSettings(**settings)
    urls = urls or ["http://127.0.0.1/x.jpg"] * len(captions)
    frame = pl.DataFrame({"url": urls, "caption": captions})
    return frame.select(per_row_reason(settings, load_blacklist(settings)))["reason"].to_list()


@pytest.mark.parametrize(
    "caption, expected",
    [
        ("一只可爱的小猫", None),
        ("2023年NBA总决赛", None),
        ("猫", "text:too_short"),
        ("很" * 51, "text:too_long"),
        ("a cute cat on the sofa", "text:not_chinese"),
        ("12345 67890", "text:not_chinese"),
        ("IMG_20230512_0931.jpg", "text:filename_or_url"),
        ("DSC00123.JPG", "text:filename_or_url"),
        ("微信图片_20230101120000.jpg", "text:filename_or_url"),
        ("微信图片_20230101120000", "text:filename_or_url"),
        ("一只可爱的\ufffd小猫", "text:replacement_char"),
        ("\ufffd\ufffd", "text:replacement_char"),  # before too_short: the damage is the reason
        ("IMG_20230512_0931", "text:filename_or_url"),
        ("https://example.com/a/b.png", "text:filename_or_url"),
        ("www.example.com", "text:filename_or_url"),
        ("美丽的风景 查看源网页", "text:blacklisted"),
        ("展开全文 一只小狗在草地上", "text:blacklisted"),
        ("雪山下的湖泊 点击查看大图", "text:blacklisted"),
    ],
)
def test_per_row_filters(caption, expected):
    assert reasons([caption]) == [expected]


def test_url_checks_come_first():
    got = reasons(["一只可爱的小猫"] * 3, urls=[None, "ftp://x/y.jpg", "data:image/png;base64,AAAA"])
    assert got == ["ingest:missing_url", "ingest:unsupported_url", "ingest:unsupported_url"]


def test_cjk_ratio_counts_letters_only():
    frame = pl.DataFrame({"c": ["猫cat", "猫猫猫!!!123", "abc", "123", "日本語のテキスト"]})
    ratios = frame.select(cjk_ratio(pl.col("c")))["c"].to_list()
    assert ratios[:4] == pytest.approx([0.25, 1.0, 0.0, 0.0])
    assert ratios[4] == pytest.approx(3 / 8)


def test_thresholds_come_from_settings():
    assert reasons(["一只猫"], min_chars=2) == [None]
    assert reasons(["猫cat"], min_chars=2, min_cjk_ratio=0.2) == [None]
    assert reasons(["IMG_1234.jpg"], reject_filenames=False, min_cjk_ratio=0.0) == [None]
    assert reasons(["美丽的风景 查看源网页"], default_blacklist=False) == [None]


def test_user_blacklist_in_traditional_matches_simplified(tmp_path):
    phrases = tmp_path / "block.txt"
    phrases.write_text("# comment\n廣告招商\n", encoding="utf-8")
    assert reasons(["本店广告招商中", "普通的一句话"], blacklist=str(phrases)) == ["text:blacklisted", None]


def write_metadata(path, rows):
    pl.DataFrame(rows, schema=["url", "caption"], orient="row").write_parquet(path)


def test_text_stage_collapses_pairs_and_caps_captions_across_files(tmp_path, make_recipe):
    spam = "高清壁纸图片大全"
    first = [(f"http://127.0.0.1/{i}.jpg", spam) for i in range(3)]
    first += [("http://127.0.0.1/a.jpg", "一只可爱的小猫"), ("http://127.0.0.1/a.jpg", "一只可爱的小猫")]
    second = [(f"http://127.0.0.1/{i}.jpg", spam) for i in range(3, 5)]
    second += [("http://127.0.0.1/a.jpg", "一隻可愛的小貓"), ("http://127.0.0.1/b.jpg", "一只可爱的小猫")]
    write_metadata(tmp_path / "m-0.parquet", first)
    write_metadata(tmp_path / "m-1.parquet", second)
    recipe = make_recipe(
        [{"name": "m", "kind": "metadata", "path": str(tmp_path / "m-*.parquet")}],
        text={"max_caption_repeats": 4},
    )
    report = run_text(recipe)
    accepted = pl.read_parquet(sorted(glob.glob(str(tmp_path / "out/work/text/accepted/*.parquet"))))
    rejected = pl.read_parquet(sorted(glob.glob(str(tmp_path / "out/work/text/rejected/*.parquet"))))
    assert (report["accepted"], report["rejected"]) == (2, 7)
    # The Traditional duplicate in the second file collapses onto the first file's row 3.
    assert accepted.select("row", "url", "caption").rows() == [
        (3, "http://127.0.0.1/a.jpg", "一只可爱的小猫"),
        (8, "http://127.0.0.1/b.jpg", "一只可爱的小猫"),
    ]
    by_row = dict(rejected.select("row", "reason").rows())
    assert by_row == {0: "text:repeated_caption", 1: "text:repeated_caption", 2: "text:repeated_caption",
                      5: "text:repeated_caption", 6: "text:repeated_caption",
                      4: "text:duplicate_pair", 7: "text:duplicate_pair"}
    dup = rejected.filter(pl.col("row") == 7).row(0, named=True)
    assert dup["duplicate_of_uid"] == 3 and dup["caption_raw"] == "一隻可愛的小貓"
    assert dup["stage"] == "text" and "row 3" in dup["detail"]
    assert "5 times (cap 4)" in rejected.filter(pl.col("row") == 0)["detail"][0]


def test_cap_off_keeps_repeats(tmp_path, make_recipe):
    write_metadata(tmp_path / "m.parquet", [(f"http://127.0.0.1/{i}.jpg", "同一个标题的图片") for i in range(30)])
    recipe = make_recipe([{"name": "m", "kind": "metadata", "path": str(tmp_path / "m.parquet")}],
                         text={"max_caption_repeats": None})
    assert run_text(recipe)["accepted"] == 30
