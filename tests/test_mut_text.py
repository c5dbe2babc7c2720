"""Text filters at their boundaries, and the global steps (duplicate pairs, caption cap) and the
accepted/rejected split on hand-made parts: what the mutation run of the text area showed untested."""

import polars as pl
import pytest

from cnclip.corpus.recipe import RecipeError, TextSettings
from cnclip.corpus.stages.text import (
    _NormalizeTask,
    _SplitTask,
    find_global_rejects,
    load_blacklist,
    normalize_part,
    per_row_reason,
    split_part,
)

URL = "http://127.0.0.1/x.jpg"


def reasons(captions, urls=None, blacklist=(), **settings):
    frame = pl.DataFrame({"url": urls or [URL] * len(captions), "caption": captions},
                         schema={"url": pl.String, "caption": pl.String})
    return frame.select(per_row_reason(TextSettings(**settings), list(blacklist)))["reason"].to_list()


def test_length_limits_are_inclusive():
    assert reasons(["猫" * 4, "猫" * 5, "猫" * 50, "猫" * 51]) == ["text:too_short", None, None, "text:too_long"]
    assert reasons(["猫" * 3, "猫" * 4, "猫" * 9, "猫" * 10], min_chars=4, max_chars=9) == [
        "text:too_short", None, None, "text:too_long"]


def test_cjk_ratio_limit_is_inclusive():
    # 5 Han + 5 Latin letters: exactly one half
    assert reasons(["猫猫猫猫猫abcde", "猫猫猫猫abcdef"]) == [None, "text:not_chinese"]
    assert reasons(["猫猫猫猫abcdef"], min_cjk_ratio=0.4) == [None]


def test_file_name_and_camera_name_boundaries():
    assert reasons(["IMG_12", "IMG_123", "截图12", "截图123"], min_cjk_ratio=0.0, min_chars=1) == [
        None, "text:filename_or_url", None, "text:filename_or_url"]
    name = "猫" * 80 + ".jpg"
    assert reasons([name, "猫" + name], max_chars=100) == ["text:filename_or_url", None]
    assert reasons(["我的照片 a.jpg", "照片.jpg的故事"], min_cjk_ratio=0.0) == [None, None]


def test_bare_url_only_when_the_whole_caption_is_one():
    assert reasons(["http://example.com/图片", "看 http://example.com/图片"], min_cjk_ratio=0.0) == [
        "text:filename_or_url", None]


def test_empty_url_is_missing_and_a_url_without_a_host_is_unsupported():
    assert reasons(["一只可爱的小猫"] * 3, urls=["", "http://", "https://127.0.0.1/a.jpg"]) == [
        "ingest:missing_url", "ingest:unsupported_url", None]


def test_blacklist_matches_case_insensitively_and_first_rule_wins():
    assert reasons(["一只可爱的小猫 ABC", "ab一只可爱的小猫"], blacklist=["abc"]) == ["text:blacklisted", None]
    # a blacklisted caption that is also too short is reported as blacklisted (rule order)
    assert reasons(["abc猫"], blacklist=["abc"]) == ["text:blacklisted"]
    assert reasons(["IMG_1234.jpg"], blacklist=["img"]) == ["text:filename_or_url"]


def test_unreadable_blacklist_is_a_one_line_recipe_error(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(RecipeError, match=r"^text\.blacklist: cannot read '.*nope\.txt' \(No such file or directory\)$"):
        load_blacklist(TextSettings(blacklist=str(missing)))


def test_blacklist_drops_comments_and_blank_lines(tmp_path):
    phrases = tmp_path / "block.txt"
    phrases.write_text("  # 注释\n\n  廣告  \n#另一个\n", encoding="utf-8")
    assert load_blacklist(TextSettings(blacklist=str(phrases), default_blacklist=False)) == ["广告"]
    assert load_blacklist(TextSettings(default_blacklist=False)) == []


def ingest_part(path, captions):
    n = len(captions)
    pl.DataFrame({"uid": list(range(1, n + 1)), "source": ["m"] * n, "row": list(range(n)), "url": [URL] * n,
                  "caption_raw": captions}).write_parquet(path)


def test_normalize_part_uses_the_parts_settings(tmp_path):
    ingest_part(tmp_path / "in.parquet", ["一隻可愛的小貓", "一隻可愛的小狗 廣告"])
    settings = TextSettings(opencc_config=None)
    count = normalize_part(_NormalizeTask(tmp_path / "in.parquet", tmp_path / "out.parquet", settings, ("廣告",)))
    frame = pl.read_parquet(tmp_path / "out.parquet")
    assert count == 2
    assert frame.select("caption", "reason").rows() == [("一隻可愛的小貓", None), ("一隻可愛的小狗 廣告", "text:blacklisted")]
    assert frame["caption_raw"].to_list() == ["一隻可愛的小貓", "一隻可愛的小狗 廣告"]


def normalized(path, rows):
    """(uid, url, caption, reason) rows of a normalized part."""
    frame = pl.DataFrame(rows, schema={"uid": pl.Int64, "url": pl.String, "caption": pl.String, "reason": pl.String},
                         orient="row")
    frame.with_columns(source=pl.lit("m"), row=pl.col("uid") % (1 << 40), caption_raw=pl.col("caption"),
                       detail=pl.lit(None, pl.String)).write_parquet(path)
    return path


SPAM = "高清壁纸图片大全"


@pytest.fixture
def parts(tmp_path):
    first = normalized(tmp_path / "a.parquet", [
        (1, "http://h/1.jpg", SPAM, None), (2, "http://h/2.jpg", SPAM, None), (3, "http://h/3.jpg", SPAM, None),
        (4, "http://h/a.jpg", "一只猫", None), (5, "http://h/a.jpg", "一只猫", None),
        (6, "http://h/6.jpg", SPAM, "text:too_short"),
    ])
    second = normalized(tmp_path / "b.parquet", [
        (7, "http://h/1.jpg", SPAM, None), (8, "http://h/a.jpg", "一只猫", None), (9, "http://h/b.jpg", "一只猫", None),
    ])
    return [first, second]


def split(tmp_path, part, found, cap):
    name = part.stem
    task = _SplitTask(part, found[0], found[1], tmp_path / f"acc-{name}.parquet", tmp_path / f"rej-{name}.parquet", cap)
    return split_part(task), task


def test_duplicate_pairs_point_at_the_first_row_across_parts(tmp_path, parts):
    found = find_global_rejects(parts, TextSettings(max_caption_repeats=None), tmp_path)
    assert pl.read_parquet(found[0]).sort("uid").rows() == [(5, 4), (7, 1), (8, 4)]
    assert pl.read_parquet(found[1]).height == 0
    assert pl.read_parquet(found[1]).schema == pl.Schema({"caption": pl.String, "caption_count": pl.UInt32})
    (accepted, rejected), task = split(tmp_path, parts[1], found, None)
    assert (accepted, rejected) == (1, 2)
    frame = pl.read_parquet(task.rejected_part)
    assert frame.select("uid", "stage", "reason", "detail", "duplicate_of_uid").rows() == [
        (7, "text", "text:duplicate_pair", "same url and caption as row 1 of this source", 1),
        (8, "text", "text:duplicate_pair", "same url and caption as row 4 of this source", 4),
    ]
    assert pl.read_parquet(task.accepted_part).columns == ["uid", "url", "caption", "source", "row", "caption_raw"]
    assert pl.read_parquet(task.accepted_part)["uid"].to_list() == [9]


def test_caption_cap_keeps_exactly_the_cap(tmp_path, parts):
    # SPAM survives pair collapsing 3 times (uids 1, 2, 3; 7 repeats uid 1's pair; 6 was rejected already)
    at_cap = find_global_rejects(parts, TextSettings(max_caption_repeats=3), tmp_path)
    assert pl.read_parquet(at_cap[1]).height == 0
    over = find_global_rejects(parts, TextSettings(max_caption_repeats=2), tmp_path)
    assert pl.read_parquet(over[1]).rows() == [(SPAM, 3)]
    (accepted, rejected), task = split(tmp_path, parts[0], over, 2)
    frame = pl.read_parquet(task.rejected_part)
    assert frame.select("uid", "reason", "detail").rows() == [
        (1, "text:repeated_caption", "caption occurs 3 times (cap 2)"),
        (2, "text:repeated_caption", "caption occurs 3 times (cap 2)"),
        (3, "text:repeated_caption", "caption occurs 3 times (cap 2)"),
        (5, "text:duplicate_pair", "same url and caption as row 4 of this source"),
        (6, "text:too_short", None),
    ]
    assert (accepted, rejected) == (1, 5)


def test_pair_collapsing_off_keeps_repeated_pairs(tmp_path, parts):
    found = find_global_rejects(parts, TextSettings(dedup_pairs=False, max_caption_repeats=None), tmp_path)
    assert pl.read_parquet(found[0]).schema == pl.Schema({"uid": pl.Int64, "first_uid": pl.Int64})
    assert pl.read_parquet(found[0]).height == 0
    (accepted, rejected), _ = split(tmp_path, parts[1], found, None)
    assert (accepted, rejected) == (3, 0)


def test_an_empty_split_removes_the_stale_part(tmp_path, parts):
    found = find_global_rejects(parts, TextSettings(max_caption_repeats=None), tmp_path)
    (tmp_path / "rej-b.parquet").write_bytes(b"stale")
    only_kept = normalized(tmp_path / "b.parquet", [(9, "http://h/b.jpg", "一只猫", None)])
    (accepted, rejected), task = split(tmp_path, only_kept, found, None)
    assert (accepted, rejected) == (1, 0)
    assert not task.rejected_part.exists() and task.accepted_part.exists()


def test_user_blacklist_adds_to_the_built_in_one(tmp_path):
    phrases = tmp_path / "block.txt"
    phrases.write_text("招商加盟\n", encoding="utf-8")
    assert reasons(["美丽的风景 查看源网页", "本店招商加盟中", "一只可爱的小猫"],
                   blacklist=load_blacklist(TextSettings(blacklist=str(phrases)))) == [
        "text:blacklisted", "text:blacklisted", None]


def test_text_stage_without_input_parts_reruns_cleanly(make_recipe, tmp_path):
    from cnclip.corpus.stages.text import run_text_stage

    recipe = make_recipe([{"name": "m", "kind": "metadata", "path": str(tmp_path / "none-*.parquet")}])
    assert run_text_stage(recipe) == {"accepted": 0, "rejected": 0}
    assert run_text_stage(recipe) == {"accepted": 0, "rejected": 0}  # folders left by the first run are fine


def test_phrases_follow_the_opencc_setting():
    from cnclip.corpus.ops.normalize import normalize_phrases

    assert normalize_phrases(["軟體"], "tw2sp") == ["软件"]
    assert normalize_phrases(["一隻貓"], None) == ["一隻貓"]


def test_opencc_batches_fall_back_to_one_call_per_caption(monkeypatch):
    """If a conversion ever changed the line count of a batch, rows must not shift."""
    from cnclip.corpus.ops import normalize

    class LineEater:
        def convert(self, text):
            return text.replace("\n", "", 1).replace("隻", "只")

    monkeypatch.setattr(normalize, "_opencc", lambda config: LineEater())
    out = normalize.convert_chinese(pl.Series("caption_x", ["一隻貓", "兩隻狗", "三"]), "t2s")
    assert out.name == "caption_x"
    assert out.to_list() == ["一只貓", "兩只狗", "三"]


def test_convert_chinese_defaults_to_traditional_to_simplified():
    from cnclip.corpus.ops.normalize import convert_chinese

    assert convert_chinese(pl.Series("c", ["一隻貓"])).to_list() == ["一只猫"]


def test_blacklist_follows_the_opencc_setting(tmp_path):
    phrases = tmp_path / "block.txt"
    phrases.write_text("廣告\n", encoding="utf-8")
    assert load_blacklist(TextSettings(blacklist=str(phrases), default_blacklist=False, opencc_config=None)) == ["廣告"]
    assert load_blacklist(TextSettings(blacklist=str(phrases), default_blacklist=False)) == ["广告"]


def test_duplicate_detail_names_the_row_within_its_source(tmp_path):
    second_source = 1 << 40  # uids are (source index << 40) + row
    part = normalized(tmp_path / "s1.parquet", [(second_source + 3, "http://h/a.jpg", "一只猫", None),
                                                (second_source + 7, "http://h/a.jpg", "一只猫", None)])
    found = find_global_rejects([part], TextSettings(max_caption_repeats=None), tmp_path)
    _, task = split(tmp_path, part, found, None)
    assert pl.read_parquet(task.rejected_part).select("uid", "detail", "duplicate_of_uid").rows() == [
        (second_source + 7, "same url and caption as row 3 of this source", second_source + 3)]


def test_one_han_letter_is_all_chinese():
    from cnclip.corpus.stages.text import cjk_ratio

    frame = pl.DataFrame({"c": ["猫", "a", "猫!!2023"]})
    assert frame.select(cjk_ratio(pl.col("c")))["c"].to_list() == [1.0, 0.0, 1.0]


def test_one_native_call_per_batch(monkeypatch):
    """The batching contract of normalize.py: one html.unescape and one OpenCC call per batch."""
    import html as html_module

    from cnclip.corpus.ops import normalize

    calls = {"unescape": 0, "convert": 0}
    real_unescape, real_converter = html_module.unescape, normalize._opencc("t2s")

    def unescape(text):
        calls["unescape"] += 1
        return real_unescape(text)

    class Counting:
        def convert(self, text):
            calls["convert"] += 1
            return real_converter.convert(text)

    monkeypatch.setattr(normalize.html, "unescape", unescape)
    monkeypatch.setattr(normalize, "_opencc", lambda config: Counting())
    out = normalize.normalize_captions(pl.Series(["一隻 貓&amp;狗", "兩 &lt;隻&gt;", "三"]))
    assert out.to_list() == ["一只 猫&狗", "两 <只>", "三"]
    assert calls == {"unescape": 1, "convert": 1}


def test_unescape_falls_back_to_one_call_per_caption(monkeypatch):
    """If the batch ever lost a separator, each caption is unescaped alone: rows never shift."""
    import html as html_module

    from cnclip.corpus.ops import normalize

    real = html_module.unescape
    monkeypatch.setattr(normalize.html, "unescape", lambda text: real(text).replace("\x01", "", 1))
    out = normalize.normalize_captions(pl.Series(["甲&amp;乙", "无实体", "丙&lt;丁", "戊&gt;"]), None)
    assert out.to_list() == ["甲&乙", "无实体", "丙<丁", "戊>"]


def test_an_empty_column_stays_a_string_column():
    from cnclip.corpus.ops.normalize import convert_chinese

    assert convert_chinese(pl.Series("c", [], dtype=pl.String)).dtype == pl.String
    assert normalize_captions_dtype() == pl.String


def normalize_captions_dtype():
    from cnclip.corpus.ops.normalize import normalize_captions

    return normalize_captions(pl.Series([], dtype=pl.String)).dtype


def test_ingest_verdicts_come_first_and_keep_their_detail(tmp_path):
    """A bad row rejected at ingest keeps that reason and its line number, whatever the text
    filters would say; a part without ingest verdicts still gets a String `detail` column."""
    path = tmp_path / "in.parquet"
    pl.DataFrame({"uid": [1, 2, 3], "source": ["m"] * 3, "row": [0, 1, 2], "url": [URL, None, URL],
                  "caption_raw": ["一只可爱的小猫咪", None, "猫"],
                  "reason": [None, "ingest:bad_row", None], "detail": [None, "line 3: invalid UTF-8", None]},
                 schema_overrides={"reason": pl.String, "detail": pl.String}).write_parquet(path)
    normalize_part(_NormalizeTask(path, tmp_path / "out.parquet", TextSettings(), ()))
    frame = pl.read_parquet(tmp_path / "out.parquet")
    assert frame.select("uid", "reason", "detail").rows() == [
        (1, None, None), (2, "ingest:bad_row", "line 3: invalid UTF-8"), (3, "text:too_short", None)]
    ingest_part(tmp_path / "plain.parquet", ["一只可爱的小猫咪"])
    normalize_part(_NormalizeTask(tmp_path / "plain.parquet", tmp_path / "plain-out.parquet", TextSettings(), ()))
    plain = pl.read_parquet(tmp_path / "plain-out.parquet")
    assert plain.schema["detail"] == pl.String and plain.schema["reason"] == pl.String
    assert plain.select("reason", "detail").rows() == [(None, None)]


@pytest.mark.parametrize("local_files, expected", [(False, "ingest:local_file_not_allowed"), (True, None)])
def test_file_urls_pass_the_text_stage_only_when_folders_are_allowed(tmp_path, local_files, expected):
    path = tmp_path / "in.parquet"
    pl.DataFrame({"uid": [1, 2], "source": ["m"] * 2, "row": [0, 1],
                  "url": ["file:///photos/猫.jpg", "ftp://h/x.jpg"],
                  "caption_raw": ["一只可爱的小猫咪", "一只可爱的小猫咪"]}).write_parquet(path)
    normalize_part(_NormalizeTask(path, tmp_path / "out.parquet", TextSettings(), (), local_files))
    assert pl.read_parquet(tmp_path / "out.parquet")["reason"].to_list() == [expected, "ingest:unsupported_url"]


def test_the_text_stage_hands_allow_local_files_to_every_part(make_recipe, tmp_path):
    from cnclip.corpus.stages.text import run_text_stage

    metadata = tmp_path / "m.parquet"
    pl.DataFrame({"url": ["file:///photos/a.jpg"], "caption": ["一只可爱的小猫咪"]}).write_parquet(metadata)
    sources = [{"name": "m", "kind": "metadata", "path": str(metadata)}]
    (tmp_path / "photos").mkdir()
    from cnclip.corpus.stages.ingest import ingest

    allowed = make_recipe(sources, download={"allow_local_files": [str(tmp_path / "photos")],
                                             "allow_networks": ["127.0.0.1/32"]})
    ingest(allowed)
    assert run_text_stage(allowed) == {"accepted": 1, "rejected": 0}
