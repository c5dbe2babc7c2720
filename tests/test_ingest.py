import polars as pl
import pytest

from cnclip.corpus.ingest import ROW_BITS, ingest
from cnclip.corpus.sources import SourceError

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
