import polars as pl
import pytest

from cnclip.corpus.sources import SourceError
from cnclip.corpus.stages.ingest import ROW_BITS, ingest

ROWS = [
    {"URL": "http://127.0.0.1/0.jpg", "TEXT": "第一张图片的标题", "LANGUAGE": "zh", "similarity": 0.31},
    {"URL": "http://127.0.0.1/1.jpg", "TEXT": "an english caption", "LANGUAGE": "en", "similarity": 0.28},
    {"URL": "http://127.0.0.1/2.jpg", "TEXT": "1984", "LANGUAGE": "zh", "similarity": 0.35},
]


def write_all_formats(folder):
    frame = pl.DataFrame(ROWS)
    frame.write_parquet(folder / "a.parquet")
    frame.write_csv(folder / "b.csv")
    frame.write_csv(folder / "c.tsv", separator="\t")
    frame.write_ndjson(folder / "d.jsonl")


def source(path, **extra):
    return {"name": "meta", "kind": "metadata", "path": str(path), "url_column": "URL", "caption_column": "TEXT",
            **extra}


def read_parts(recipe):
    parts = sorted((recipe.output_dir / "work" / "ingest").glob("*.parquet"))
    return pl.concat([pl.read_parquet(p) for p in parts], how="diagonal_relaxed")


def test_every_format_where_and_keep_columns(tmp_path, make_recipe):
    write_all_formats(tmp_path)
    recipe = make_recipe([source(tmp_path / "*", where="LANGUAGE = 'zh'", keep_columns=["similarity"])])
    report = ingest(recipe)
    rows = read_parts(recipe)
    assert report == {"rows_by_source": {"meta": 8}, "file_errors": [], "source_reports": {}}
    # Files in sorted order, numbered after `where`; captions stay text ("1984" is not a number).
    assert rows["row"].to_list() == list(range(8))
    assert rows["caption_raw"].to_list() == ["第一张图片的标题", "1984"] * 4
    assert rows["uid"].to_list() == list(range(8))
    assert rows["similarity"].cast(pl.Float64).to_list() == pytest.approx([0.31, 0.35] * 4)


def test_uid_packs_source_and_row(tmp_path, make_recipe):
    pl.DataFrame(ROWS).write_parquet(tmp_path / "a.parquet")
    recipe = make_recipe([source(tmp_path / "a.parquet"), {**source(tmp_path / "a.parquet"), "name": "again"}])
    ingest(recipe)
    rows = read_parts(recipe)
    assert rows.filter(pl.col("source") == "again")["uid"].to_list() == [(1 << ROW_BITS) + i for i in range(3)]


def test_bad_file_is_reported_and_skipped(tmp_path, make_recipe):
    pl.DataFrame(ROWS).write_parquet(tmp_path / "a.parquet")
    (tmp_path / "b.parquet").write_bytes(b"not a parquet file")
    pl.DataFrame({"link": ["x"]}).write_parquet(tmp_path / "c.parquet")
    report = ingest(make_recipe([source(tmp_path / "*.parquet")]))
    assert report["rows_by_source"] == {"meta": 3}
    assert len(report["file_errors"]) == 2
    assert report["file_errors"][0].startswith(f"{tmp_path / 'b.parquet'}: unreadable")
    assert report["file_errors"][1].startswith(f"{tmp_path / 'c.parquet'}: no column 'URL' (source key url_column)")


def test_source_with_nothing_readable_stops_before_any_work(tmp_path, make_recipe):
    pl.DataFrame({"link": ["x"]}).write_parquet(tmp_path / "c.parquet")
    with pytest.raises(SourceError, match="none of its 1 file"):
        ingest(make_recipe([source(tmp_path / "c.parquet")]))
    with pytest.raises(SourceError, match="matches no file"):
        ingest(make_recipe([source(tmp_path / "nothing-*.parquet")]))


def test_bad_where_names_the_file(tmp_path, make_recipe):
    pl.DataFrame(ROWS).write_parquet(tmp_path / "a.parquet")
    with pytest.raises(SourceError, match=r"a.parquet: where 'NOPE = 1'"):
        ingest(make_recipe([source(tmp_path / "a.parquet", where="NOPE = 1")]))


# --- one bad row costs one row -------------------------------------------------------------------

CSV_LINES = [b"URL,TEXT", b"http://127.0.0.1/0.jpg,\xe7\xac\xac\xe4\xb8\x80\xe5\xbc\xa0", b"http://127.0.0.1/1.jpg,caf\xff bad byte",
             b"http://127.0.0.1/2.jpg,\"multi", b"line caption\"", b"http://127.0.0.1/3.jpg,\"broken quote",
             b"http://127.0.0.1/4.jpg,last", b'http://127.0.0.1/5.jpg,"closed"early']


def bad_rows(rows):
    return rows.filter(pl.col("reason").is_not_null()).select("row", "reason", "detail").rows()


@pytest.mark.parametrize("name, separator", [("list.csv", b","), ("list.tsv", b"\t"), ("list.csv.gz", b",")])
def test_bad_byte_and_broken_quote_cost_one_row_each(tmp_path, make_recipe, name, separator):
    import gzip

    data = b"\n".join(line.replace(b",", separator) for line in CSV_LINES) + b"\n"
    (tmp_path / name).write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
    recipe = make_recipe([source(tmp_path / name)])
    report = ingest(recipe)
    rows = read_parts(recipe)
    assert report["rows_by_source"] == {"meta": 6} and report["file_errors"] == []
    assert rows["row"].to_list() == list(range(6)) and rows["uid"].to_list() == list(range(6))
    assert rows["url"].to_list() == ["http://127.0.0.1/0.jpg", None, "http://127.0.0.1/2.jpg", None,
                                     "http://127.0.0.1/4.jpg", None]
    # A quoted field spanning lines is one record; the quote that never closes is one bad row and
    # does not swallow the lines after it.
    assert rows["caption_raw"].to_list() == ["第一张", None, "multi\nline caption", None, "last", None]
    assert bad_rows(rows) == [(1, "ingest:bad_row", "line 3: invalid UTF-8"),
                              (3, "ingest:bad_row", "line 6: unbalanced quote"),
                              (5, "ingest:bad_row", f"line 8: malformed quoted field ('{separator.decode()}' "
                                                    "expected after '\"')")]


JSONL = [b'{"URL": "http://127.0.0.1/0.jpg", "TEXT": "first"}',
         b'{"URL": "http://127.0.0.1/1.jpg", "TEXT": "trunc',
         b'{"URL": "http://127.0.0.1/2.jpg", "TEXT": {"zh": "object"}}',
         b'',
         b'{"URL": "http://127.0.0.1/3.jpg", "TEXT": ["a", "list"]}',
         b'{"URL": "http://127.0.0.1/4.jpg", "TEXT": 1984}',
         b'{"URL": "http://127.0.0.1/5.jpg", "TEXT": "caf\xff"}',
         b'["not", "an", "object"]',
         b'{"URL": "http://127.0.0.1/7.jpg", "TEXT": "1984"}',
         b'{"URL": "http://127.0.0.1/8.jpg"}']


def test_jsonl_bad_lines_and_non_text_captions_are_rows(tmp_path, make_recipe):
    (tmp_path / "d.jsonl").write_bytes(b"\n".join(JSONL) + b"\n")
    recipe = make_recipe([source(tmp_path / "d.jsonl")])
    assert ingest(recipe)["rows_by_source"] == {"meta": 9}  # the blank line is no row
    rows = read_parts(recipe)
    # Captions are never stringified: the string "1984" stays, the number 1984 is rejected.
    assert rows.filter(pl.col("reason").is_null()).select("url", "caption_raw").rows() == [
        ("http://127.0.0.1/0.jpg", "first"), ("http://127.0.0.1/7.jpg", "1984"), ("http://127.0.0.1/8.jpg", None)]
    found = bad_rows(rows)
    assert [(row, reason) for row, reason, _ in found] == [
        (1, "ingest:bad_row"), (2, "ingest:caption_not_text"), (3, "ingest:caption_not_text"),
        (4, "ingest:caption_not_text"), (5, "ingest:bad_row"), (6, "ingest:bad_row")]
    details = [detail for _, _, detail in found]
    assert details[0].startswith("line 2: not valid JSON")
    assert details[1:5] == ["line 3: 'TEXT' is an object, not a string", "line 5: 'TEXT' is a list, not a string",
                            "line 6: 'TEXT' is a number, not a string", "line 7: invalid UTF-8"]
    assert details[5] == "line 8: not a JSON object"


def test_jsonl_mixed_captions_that_polars_would_stringify(tmp_path, make_recipe):
    # Every line is valid JSON: polars alone reads the object and the number as the strings
    # '{"zh": "x"}' and '7'.
    lines = [b'{"URL": "http://127.0.0.1/0.jpg", "TEXT": "text"}', b'{"URL": "http://127.0.0.1/1.jpg", "TEXT": 7}',
             b'{"URL": "http://127.0.0.1/2.jpg", "TEXT": {"zh": "x"}}']
    (tmp_path / "d.jsonl").write_bytes(b"\n".join(lines))
    recipe = make_recipe([source(tmp_path / "d.jsonl")])
    ingest(recipe)
    rows = read_parts(recipe)
    assert rows["caption_raw"].to_list() == ["text", None, None]
    assert rows["reason"].to_list() == [None, "ingest:caption_not_text", "ingest:caption_not_text"]
    # Only the caption was bad: the row keeps its URL, as a Parquet row with a numeric caption does.
    assert rows["url"].to_list() == [f"http://127.0.0.1/{i}.jpg" for i in range(3)]


def test_parquet_caption_column_that_is_not_text(tmp_path, make_recipe):
    pl.DataFrame({"URL": ["http://127.0.0.1/0.jpg", "http://127.0.0.1/1.jpg"], "TEXT": [1984, None]}).write_parquet(
        tmp_path / "n.parquet")
    recipe = make_recipe([source(tmp_path / "n.parquet")])
    ingest(recipe)
    rows = read_parts(recipe)
    assert rows.select("caption_raw", "reason", "detail").rows() == [
        (None, "ingest:caption_not_text", "column 'TEXT' is Int64, not text"), (None, None, None)]


def test_where_applies_to_readable_rows_and_bad_rows_still_count(tmp_path, make_recipe):
    lines = [b"URL,TEXT,LANGUAGE", b"http://127.0.0.1/0.jpg,zh caption,zh", b"http://127.0.0.1/1.jpg,en caption,en",
             b"http://127.0.0.1/2.jpg,\xff,zh", b"http://127.0.0.1/3.jpg,another,zh"]
    (tmp_path / "l.csv").write_bytes(b"\n".join(lines))
    recipe = make_recipe([source(tmp_path / "l.csv", where="LANGUAGE = 'zh'", keep_columns=["LANGUAGE"])])
    ingest(recipe)
    rows = read_parts(recipe)
    assert rows.select("row", "url", "LANGUAGE", "reason").rows() == [
        (0, "http://127.0.0.1/0.jpg", "zh", None), (1, None, None, "ingest:bad_row"),
        (2, "http://127.0.0.1/3.jpg", "zh", None)]


def test_a_sources_only_file_with_a_bad_byte_does_not_stop_the_build(tmp_path, make_recipe):
    from cnclip.corpus import run_text

    (tmp_path / "bad.csv").write_bytes(b"URL,TEXT\nhttp://127.0.0.1/0.jpg,\xe4\xb8\x80\xe5\x8f\xaa\xe5\x8f\xaf"
                                       b"\xe7\x88\xb1\xe7\x9a\x84\xe5\xb0\x8f\xe7\x8c\xab\nhttp://127.0.0.1/1.jpg,\xc3\n")
    pl.DataFrame(ROWS).write_parquet(tmp_path / "good.parquet")
    recipe = make_recipe([source(tmp_path / "bad.csv"), {**source(tmp_path / "good.parquet"), "name": "other"}])
    report = run_text(recipe)
    assert report["accepted"] + report["rejected"] == 5
    rejected = pl.read_parquet(recipe.output_dir / "work" / "text" / "rejected" / "000-00000.parquet")
    assert rejected.select("uid", "row", "source", "stage", "reason", "detail").rows() == [
        (1, 1, "meta", "ingest", "ingest:bad_row", "line 3: invalid UTF-8")]
    accepted = pl.read_parquet(recipe.output_dir / "work" / "text" / "accepted" / "000-00000.parquet")
    assert accepted["caption"].to_list() == ["一只可爱的小猫"]


@pytest.mark.parametrize("body", [b"http://127.0.0.1/0.jpg,x\n", b"http://127.0.0.1/0.jpg,\xff\n"])
def test_text_file_whose_header_is_unreadable_is_a_file_error(tmp_path, make_recipe, body):
    # Without readable column names no row can be told apart: the file is reported and skipped.
    (tmp_path / "a.csv").write_bytes(b"UR\xffL,TEXT\n" + body)
    pl.DataFrame(ROWS).write_parquet(tmp_path / "b.parquet")
    report = ingest(make_recipe([source(tmp_path / "*")]))
    assert report["rows_by_source"] == {"meta": 3}
    assert len(report["file_errors"]) == 1
    assert report["file_errors"][0].startswith(f"{tmp_path / 'a.csv'}: ")
    assert "no column 'URL' (source key url_column)" in report["file_errors"][0]


def test_line_reader_refuses_an_unreadable_header(tmp_path):
    from cnclip.corpus.sources.rows import HeaderError, read_delimited_lines

    (tmp_path / "a.csv").write_bytes(b"URL,\"TEXT\nhttp://127.0.0.1/0.jpg,x\n")
    with pytest.raises(HeaderError, match="header line is not readable"):
        read_delimited_lines(str(tmp_path / "a.csv"), ",")
    (tmp_path / "b.csv").write_bytes(b"")
    with pytest.raises(HeaderError, match="empty file"):
        read_delimited_lines(str(tmp_path / "b.csv"), ",")


@pytest.mark.slow
def test_build_with_a_bad_byte_publishes_the_good_rows_and_accounts_for_the_bad(tmp_path, web_root, web,
                                                                                  make_recipe):
    import random

    from cnclip.corpus import build
    from cnclip.corpus.sources.sample_web import draw_shape

    draw_shape((200, 30, 30), "圆形", random.Random(0)).save(web_root / "0.png")
    draw_shape((30, 30, 200), "方形", random.Random(1)).save(web_root / "1.png")
    lines = ["url,caption", f"{web.base_url}/0.png,一张红色圆形的图片", f"{web.base_url}/x.png,损坏的标题",
             f"{web.base_url}/1.png,一张蓝色方形的图片"]
    data = "\n".join(lines).encode().replace("损坏".encode(), b"\xe6\x8d")  # a truncated character
    (tmp_path / "only.csv").write_bytes(data + b"\n")
    recipe = make_recipe([{"name": "only", "kind": "metadata", "path": str(tmp_path / "only.csv")}])
    funnel = build(recipe, show_funnel=False)
    samples = pl.read_parquet(recipe.manifest_dir / "samples" / "*.parquet")
    rejected = pl.concat([pl.read_parquet(p) for p in sorted((recipe.manifest_dir / "rejected").glob("*.parquet"))],
                         how="diagonal_relaxed")
    assert samples.select("row", "caption").rows() == [(0, "一张红色圆形的图片"), (2, "一张蓝色方形的图片")]
    assert rejected.select("uid", "row", "stage", "reason", "detail").rows() == [
        (1, 1, "ingest", "ingest:bad_row", "line 3: invalid UTF-8")]
    assert (funnel["input_rows"], funnel["samples"], funnel["rejected"]) == (3, 2, 1)
    assert funnel["stages"][0] == {"stage": "ingest", "in": 3, "out": 2, "rejected": {"ingest:bad_row": 1}}
    assert funnel["file_errors"] == []


def test_file_of_only_bad_lines_is_all_rejected_rows(tmp_path, make_recipe):
    (tmp_path / "a.jsonl").write_bytes(b'{"URL": 1,\n\xff\n')
    (tmp_path / "b.csv").write_bytes(b'URL,TEXT\n\xff,x\n')
    (tmp_path / "c.csv").write_bytes(b'LINK,TEXT\n\xff,x\n')  # no URL column: a file error, as before
    recipe = make_recipe([source(tmp_path / "*")])
    report = ingest(recipe)
    assert report["rows_by_source"] == {"meta": 3}
    assert len(report["file_errors"]) == 1 and "c.csv: no column 'URL'" in report["file_errors"][0]
    found = bad_rows(read_parts(recipe))
    assert [(row, reason) for row, reason, _ in found] == [(0, "ingest:bad_row"), (1, "ingest:bad_row"),
                                                           (2, "ingest:bad_row")]
    assert found[0][2].startswith("line 1: not valid JSON (")
    assert [detail for _, _, detail in found[1:]] == ["line 2: invalid UTF-8", "line 2: invalid UTF-8"]
