"""The build's accounting (funnel.py) and reject labelling (shard.write_rejects), unit-level.

Each test lays out the manifests and work files a build would leave, by hand, so a lost,
duplicated or mislabelled row is caught in milliseconds instead of by an end-to-end build.
"""

import json

import polars as pl
import pytest
from rich.console import Console

from cnclip.corpus.manifests.funnel import AccountingError, compute_funnel, funnel_table, print_funnel, write_funnel
from cnclip.corpus.manifests.schemas import REJECTED_SCHEMA
from cnclip.corpus.runtime.layout import BuildLayout
from cnclip.corpus.stages.download_attempts import write_attempts
from cnclip.corpus.stages.shard import write_rejects

REJECTED_FIELDS = list(REJECTED_SCHEMA)


@pytest.fixture
def layout(tmp_path):
    return BuildLayout(tmp_path / "out", tmp_path / "manifests")


def ingest_summary(layout, rows_by_source, **extra):
    layout.work.mkdir(parents=True, exist_ok=True)
    summary = {"rows_by_source": rows_by_source, "file_errors": extra.pop("file_errors", []), **extra}
    (layout.work / "ingest.state.json").write_text(json.dumps({"summary": summary}), encoding="utf-8")


def samples(layout, name, uids):
    layout.samples_dir.mkdir(parents=True, exist_ok=True)
    pl.DataFrame({"uid": uids, "key": [f"k{u}" for u in uids]}, schema={"uid": pl.Int64, "key": pl.String}
                 ).write_parquet(layout.samples_dir / name)


def rejects(layout, name, rows):
    layout.rejected_dir.mkdir(parents=True, exist_ok=True)
    pl.DataFrame(rows, schema={"uid": pl.Int64, "stage": pl.String, "reason": pl.String}, orient="row"
                 ).write_parquet(layout.rejected_dir / name)


def a_build(layout):
    """10 input rows: 4 samples in two parts, 6 rejects at four stages."""
    ingest_summary(layout, {"web": 7, "csv": 3}, file_errors=["bad.csv: unreadable"], source_reports={"web": {"pages": 2}})
    samples(layout, "00000.parquet", [1, 2, 3])
    samples(layout, "00001.parquet", [4])
    rejects(layout, "text-a.parquet", [(5, "ingest", "ingest:missing_url"), (6, "text", "text:too_short"),
                                       (7, "text", "text:too_short")])
    rejects(layout, "download.parquet", [(8, "download", "download:failed_to_download")])
    rejects(layout, "dedup.parquet", [(9, "dedup", "dedup:near_duplicate"), (10, "dedup", "dedup:exact_duplicate")])


def test_funnel_counts_each_stage_from_the_manifests(layout):
    a_build(layout)
    funnel = compute_funnel(layout, "demo")
    assert funnel == {
        "name": "demo",
        "shards_dir": str(layout.shards_dir.resolve()),
        "input_rows": 10,
        "rows_by_source": {"web": 7, "csv": 3},
        "file_errors": ["bad.csv: unreadable"],
        "source_reports": {"web": {"pages": 2}},
        "stages": [
            {"stage": "ingest", "in": 10, "out": 9, "rejected": {"ingest:missing_url": 1}},
            {"stage": "text", "in": 9, "out": 7, "rejected": {"text:too_short": 2}},
            {"stage": "download", "in": 7, "out": 6, "rejected": {"download:failed_to_download": 1}},
            {"stage": "dedup", "in": 6, "out": 4, "rejected": {"dedup:exact_duplicate": 1, "dedup:near_duplicate": 1}},
            {"stage": "shard", "in": 4, "out": 4, "rejected": {}},
        ],
        "samples": 4,
        "rejected": 6,
        "rejected_by_reason": {"ingest:missing_url": 1, "text:too_short": 2, "download:failed_to_download": 1,
                               "dedup:exact_duplicate": 1, "dedup:near_duplicate": 1},
    }


def test_shards_dir_is_absolute_for_a_relative_output_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    layout = BuildLayout(tmp_path.joinpath("out").relative_to(tmp_path), tmp_path / "m")
    ingest_summary(layout, {"a": 1})
    samples(layout, "00000.parquet", [1])
    assert compute_funnel(layout, "x")["shards_dir"] == str(tmp_path / "out" / "shards")


def test_same_reason_at_two_stages_adds_up(layout):
    ingest_summary(layout, {"a": 3})
    rejects(layout, "x.parquet", [(1, "text", "shared:reason"), (2, "download", "shared:reason")])
    samples(layout, "00000.parquet", [3])
    funnel = compute_funnel(layout, "x")
    assert funnel["rejected_by_reason"] == {"shared:reason": 2}
    assert funnel["rejected"] == 2
    assert [s["rejected"] for s in funnel["stages"]][1:3] == [{"shared:reason": 1}, {"shared:reason": 1}]


def test_rejects_of_an_unlisted_stage_count_in_the_totals(layout):
    ingest_summary(layout, {"a": 2})
    samples(layout, "00000.parquet", [1])
    rejects(layout, "x.parquet", [(2, "future", "future:reason")])
    funnel = compute_funnel(layout, "x")
    assert (funnel["samples"], funnel["rejected"], funnel["rejected_by_reason"]) == (1, 1, {"future:reason": 1})
    assert [s["out"] for s in funnel["stages"]] == [2, 2, 2, 2, 2]


def test_missing_source_reports_read_as_empty(layout):
    ingest_summary(layout, {"a": 1})
    samples(layout, "00000.parquet", [1])
    assert compute_funnel(layout, "x")["source_reports"] == {}


def test_a_lost_row_fails_the_build(layout):
    a_build(layout)
    ingest_summary(layout, {"web": 7, "csv": 4})
    with pytest.raises(AccountingError) as err:
        compute_funnel(layout, "demo")
    assert str(err.value) == f"{layout.manifest_dir}: 11 input rows but 4 samples + 6 rejected (10 distinct rows)"


def test_an_extra_row_fails_the_build(layout):
    a_build(layout)
    samples(layout, "00002.parquet", [11])
    with pytest.raises(AccountingError, match=r": 10 input rows but 5 samples \+ 6 rejected \(11 distinct rows\)$"):
        compute_funnel(layout, "demo")


def test_a_row_in_samples_and_rejected_fails_even_when_the_totals_match(layout):
    a_build(layout)
    samples(layout, "00001.parquet", [5])  # uid 5 is also rejected; uid 4 is now lost
    with pytest.raises(AccountingError, match=r"4 samples \+ 6 rejected \(9 distinct rows\)$"):
        compute_funnel(layout, "demo")


def test_a_row_rejected_twice_fails(layout):
    ingest_summary(layout, {"a": 2})
    samples(layout, "00000.parquet", [1])
    rejects(layout, "x.parquet", [(2, "text", "text:too_short")])
    rejects(layout, "y.parquet", [(1, "download", "download:failed_to_download")])
    with pytest.raises(AccountingError, match=r"2 input rows but 1 samples \+ 2 rejected \(2 distinct rows\)"):
        compute_funnel(layout, "x")


def test_no_manifests_add_up_only_for_no_input(layout):
    ingest_summary(layout, {})
    funnel = compute_funnel(layout, "empty")
    assert (funnel["input_rows"], funnel["samples"], funnel["rejected"]) == (0, 0, 0)
    assert funnel["stages"][0] == {"stage": "ingest", "in": 0, "out": 0, "rejected": {}}
    ingest_summary(layout, {"a": 3})
    with pytest.raises(AccountingError, match=r"3 input rows but 0 samples \+ 0 rejected \(0 distinct rows\)"):
        compute_funnel(layout, "empty")


def test_only_rejects_or_only_samples(layout):
    ingest_summary(layout, {"a": 2})
    rejects(layout, "x.parquet", [(1, "text", "text:too_short"), (2, "text", "text:too_long")])
    assert compute_funnel(layout, "x")["samples"] == 0
    for part in layout.rejected_dir.glob("*"):
        part.unlink()
    samples(layout, "00000.parquet", [1, 2])
    funnel = compute_funnel(layout, "x")
    assert (funnel["samples"], funnel["rejected"], funnel["rejected_by_reason"]) == (2, 0, {})


def test_write_funnel_writes_what_it_returns(layout):
    a_build(layout)
    funnel = write_funnel(layout, "demo")
    assert json.loads(layout.funnel_path.read_text(encoding="utf-8")) == funnel
    assert (funnel["name"], funnel["samples"]) == ("demo", 4)


def render(funnel, width=200):
    console = Console(width=width, record=True, color_system=None)
    console.print(funnel_table(funnel))
    return console.export_text()


def table_rows(text):
    return [line for line in text.splitlines() if line.startswith(("│", "┃"))]


def test_funnel_table_shows_kept_share_and_reasons_by_count(layout):
    a_build(layout)
    rejects(layout, "dedup.parquet", [(9, "dedup", "dedup:near_duplicate"), (10, "dedup", "dedup:exact_duplicate"),
                                      (3, "dedup", "dedup:exact_duplicate")])
    samples(layout, "00000.parquet", [1, 2])
    funnel = compute_funnel(layout, "demo")
    text = render(funnel)
    assert "funnel: demo (10 input rows)" in text
    assert "3 samples, 7 rejected" in text
    assert table_rows(text) == [
        "┃ stage    ┃ in ┃ out ┃   kept ┃ rejected by reason                  ┃",
        "│ ingest   │ 10 │   9 │  90.0% │ missing_url 1                       │",
        "│ text     │  9 │   7 │  77.8% │ too_short 2                         │",
        "│ download │  7 │   6 │  85.7% │ failed_to_download 1                │",
        "│ dedup    │  6 │   3 │  50.0% │ exact_duplicate 2, near_duplicate 1 │",
        "│ shard    │  3 │   3 │ 100.0% │ -                                   │",
    ]


def test_funnel_table_of_an_empty_build_has_no_share(layout):
    ingest_summary(layout, {})
    rows = table_rows(render(compute_funnel(layout, "empty")))
    assert rows[1] == "│ ingest   │  0 │   0 │    - │ -                  │"


def test_print_funnel_prints_the_table(layout, monkeypatch):
    from cnclip.corpus.manifests import funnel as funnel_module

    a_build(layout)
    console = Console(width=200, record=True, color_system=None)
    monkeypatch.setattr(funnel_module, "console", console)
    print_funnel(compute_funnel(layout, "demo"))
    assert "funnel: demo (10 input rows)" in console.export_text()


# --- reject labelling: shard.write_rejects ---------------------------------------------------

CANDIDATE = {"uid": pl.Int64, "source": pl.String, "row": pl.Int64, "url": pl.String,
             "caption_raw": pl.String, "caption": pl.String}


def candidates(uids):
    return pl.DataFrame({"uid": uids, "source": ["web"] * len(uids), "row": uids,
                         "url": [f"http://127.0.0.1/{u}.jpg" for u in uids],
                         "caption_raw": [f"标题 {u}" for u in uids], "caption": [f"标题{u}" for u in uids]},
                        schema=CANDIDATE)


def write(frame, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.write_parquet(path)


def downloads(layout, rows, name="00000.parquet"):
    """img2dataset's per-row results: (uid, status, error_message)."""
    frame = pl.DataFrame(
        {"uid": [r[0] for r in rows], "key": [f"{i:09d}" for i in range(len(rows))],
         "status": [r[1] for r in rows], "error_message": [r[2] for r in rows],
         "width": [32] * len(rows), "height": [24] * len(rows), "original_width": [320] * len(rows),
         "original_height": [240] * len(rows), "sha256": [f"sha{r[0]}" for r in rows]},
        schema={"uid": pl.Int64, "key": pl.String, "status": pl.String, "error_message": pl.String,
                "width": pl.Int64, "height": pl.Int64, "original_width": pl.Int64, "original_height": pl.Int64,
                "sha256": pl.String})
    write(frame, layout.download_dir / name)
    write_attempts(layout.download_dir)  # img2dataset's results read once, as the download stage does


def decisions(layout, rows):
    write(pl.DataFrame(rows, schema={"uid": pl.Int64, "reason": pl.String, "duplicate_of_uid": pl.Int64,
                                     "duplicate_of_eval": pl.String, "detail": pl.String}, orient="row"),
          layout.dedup_decisions)


def plan(layout, keys):
    write(pl.DataFrame({"uid": list(keys), "key": list(keys.values())}, schema={"uid": pl.Int64, "key": pl.String}),
          layout.shard_plan)


def text_rejects(layout, rows, name="p-0.parquet"):
    """(uid, reason, detail, duplicate_of_uid) rows as the text stage writes them."""
    frame = candidates([r[0] for r in rows]).with_columns(
        reason=pl.Series([r[1] for r in rows], dtype=pl.String),
        detail=pl.Series([r[2] for r in rows], dtype=pl.String),
        duplicate_of_uid=pl.Series([r[3] for r in rows], dtype=pl.Int64),
    ).with_columns(stage=pl.col("reason").str.split(":").list.first())
    write(frame, layout.text_rejected_dir / name)


@pytest.fixture
def labelled(layout):
    """uids 1..7 accepted by the text stage, 8..9 rejected there; 1 and 5 are kept samples."""
    write(candidates([1, 2, 3, 4, 5, 6, 7]), layout.text_accepted_dir / "p-0.parquet")
    text_rejects(layout, [(9, "text:duplicate_pair", "same url and caption as row 1 of this source", 1),
                          (8, "text:too_short", None, None)])
    downloads(layout, [(1, "success", None), (2, "success", None), (3, "success", None),
                       (4, "failed_to_download", "  HTTP Error 404: Not Found \n"), (5, "success", None),
                       (6, "failed_to_resize", None)])
    decisions(layout, [(3, "dedup:near_duplicate", 1, None, "pHash distance 2 to the kept image"),
                       (2, "dedup:eval_overlap", None, "evals/cat.jpg", "pHash distance 0")])
    plan(layout, {1: "000000", 5: "000001"})
    write_rejects(layout, {})
    return layout


def read(path):
    return pl.read_parquet(path)


def test_text_rejects_name_the_kept_samples_key(labelled):
    frame = read(labelled.rejected_dir / "text-p-0.parquet")
    assert frame.columns[:len(REJECTED_FIELDS)] == REJECTED_FIELDS
    assert frame.select("uid", "stage", "reason", "duplicate_of").rows() == [
        (8, "text", "text:too_short", None), (9, "text", "text:duplicate_pair", "000000")]
    assert frame["duplicate_of_uid"].to_list() == [None, 1]


def test_download_rejects_carry_reason_and_stripped_detail(labelled):
    frame = read(labelled.rejected_dir / "download.parquet")
    assert frame.select("uid", "stage", "reason", "detail").rows() == [
        (4, "download", "download:failed_to_download", "HTTP Error 404: Not Found"),
        (6, "download", "download:failed_to_resize", None),
        (7, "download", "download:not_attempted", "img2dataset reported no status for this row"),
    ]
    assert frame.columns[:6] == ["uid", "source", "row", "url", "caption_raw", "caption"]
    assert frame["url"].to_list() == [f"http://127.0.0.1/{u}.jpg" for u in (4, 6, 7)]


def test_dedup_rejects_name_the_kept_key_or_the_eval_image(labelled):
    frame = read(labelled.rejected_dir / "dedup.parquet")
    assert frame.select("uid", "stage", "reason", "duplicate_of", "detail").rows() == [
        (2, "dedup", "dedup:eval_overlap", "evals/cat.jpg", "pHash distance 0"),
        (3, "dedup", "dedup:near_duplicate", "000000", "pHash distance 2 to the kept image"),
    ]
    assert "duplicate_of_eval" not in frame.columns
    assert frame.select("width", "height", "original_width", "original_height", "sha256").rows() == [
        (32, 24, 320, 240, "sha2"), (32, 24, 320, 240, "sha3")]
    assert frame.columns[:len(REJECTED_FIELDS)] == REJECTED_FIELDS


def test_every_accepted_row_is_kept_or_rejected_once(labelled):
    rejected = pl.concat([read(p).select("uid") for p in sorted(labelled.rejected_dir.glob("*.parquet"))])
    assert sorted(rejected["uid"].to_list() + [1, 5]) == list(range(1, 10))
    assert sorted(p.name for p in labelled.rejected_dir.glob("*.parquet")) == [
        "dedup.parquet", "download.parquet", "text-p-0.parquet"]


def test_a_stage_without_rejects_leaves_no_stale_part(layout):
    write(candidates([1, 2]), layout.text_accepted_dir / "p-0.parquet")
    downloads(layout, [(1, "success", None), (2, "success", None)])
    decisions(layout, [])
    plan(layout, {1: "000000", 2: "000001"})
    layout.rejected_dir.mkdir(parents=True)
    for stale in ("download.parquet", "dedup.parquet"):
        (layout.rejected_dir / stale).write_bytes(b"stale")
    write_rejects(layout, {})
    # The stale bytes are replaced by 0-row parts of the one rejected schema: the folder reads in one line.
    assert sorted(p.name for p in layout.rejected_dir.iterdir()) == ["dedup.parquet", "download.parquet"]
    for part in layout.rejected_dir.iterdir():
        assert read(part).height == 0 and read(part).columns == REJECTED_FIELDS


def test_without_any_download_part_every_accepted_row_is_not_attempted(layout):
    write(candidates([3, 1, 2]), layout.text_accepted_dir / "p-0.parquet")
    layout.download_dir.mkdir(parents=True)
    plan(layout, {})
    write_rejects(layout, {})
    frame = read(layout.rejected_dir / "download.parquet")
    assert frame.select("uid", "reason").rows() == [(u, "download:not_attempted") for u in (1, 2, 3)]
    assert read(layout.rejected_dir / "dedup.parquet").height == 0


def cells(text):
    return [[c.strip() for c in line.split("│")[1:-1]] for line in text.splitlines() if line.startswith("│")]


def test_funnel_table_orders_reasons_by_count_then_by_name(layout):
    a_build(layout)
    samples(layout, "00000.parquet", [])
    rejects(layout, "dedup.parquet", [(9, "dedup", "dedup:near_duplicate"), (10, "dedup", "dedup:exact_duplicate"),
                                      (3, "dedup", "dedup:near_duplicate"), (2, "dedup", "dedup:eval_overlap"),
                                      (1, "dedup", "dedup:eval_overlap")])
    text = render(compute_funnel(layout, "demo"))
    assert cells(text)[3] == ["dedup", "6", "1", "16.7%", "eval_overlap 2, near_duplicate 2, exact_duplicate 1"]
    assert "1 samples, 9 rejected" in text


def test_funnel_lists_reasons_in_stage_then_reason_order(layout):
    """funnel.json is the same bytes for the same build: reasons in (stage, reason) order."""
    ingest_summary(layout, {"a": 5})
    rejects(layout, "x.parquet", [(1, "ingest", "ingest:missing_url"), (2, "download", "network:blocked_address"),
                                  (3, "download", "download:failed_to_download"), (4, "dedup", "dedup:near_duplicate"),
                                  (5, "download", "network:blocked_address")])
    funnel = compute_funnel(layout, "x")
    assert list(funnel["rejected_by_reason"].items()) == [
        ("dedup:near_duplicate", 1), ("download:failed_to_download", 1), ("network:blocked_address", 2),
        ("ingest:missing_url", 1)]
    assert list(funnel["stages"][2]["rejected"]) == ["download:failed_to_download", "network:blocked_address"]


def test_verify_re_adds_the_manifests_on_disk_to_the_funnels_input_rows(tmp_path):
    """`corpus verify`'s accounting: samples + rejected on disk against funnel.json's input_rows."""
    from cnclip.corpus.manifests.funnel import accounting_problem

    (tmp_path / "samples").mkdir()
    (tmp_path / "rejected").mkdir()
    pl.DataFrame({"uid": [1, 2]}).write_parquet(tmp_path / "samples" / "00000.parquet")
    pl.DataFrame({"uid": [3], "stage": ["text"], "reason": ["text:too_short"]}).write_parquet(
        tmp_path / "rejected" / "text-p.parquet")
    funnel = tmp_path / "funnel.json"
    funnel.write_text(json.dumps({"name": "猫的语料", "input_rows": 3}, ensure_ascii=False), encoding="utf-8")
    assert accounting_problem(tmp_path) is None
    funnel.write_text(json.dumps({"name": "猫的语料", "input_rows": 4}, ensure_ascii=False), encoding="utf-8")
    assert accounting_problem(tmp_path) == f"{tmp_path}: 4 input rows but 2 samples + 1 rejected (3 distinct rows)"
    funnel.unlink()
    assert accounting_problem(tmp_path).startswith(f"{funnel}: unreadable (")
