"""The corpus and run reports as files, read without a browser (tests/test_report_browser.py
renders them): numbers against funnel.json, images against the tar members they come from, what
a report says when work/ is gone, and the two commands' exit codes and one-line errors."""

from __future__ import annotations

import base64
import json
import tarfile

import polars as pl
import pytest
from typer.testing import CliRunner

from cnclip.cli import app
from cnclip.report.corpus import write_corpus_report
from cnclip.report.train import samples_axis, write_train_report
from html_elements import elements, with_attr
from synthetic_corpus import write_synthetic_corpus

runner = CliRunner()


def _count(text: str) -> int:
    return int(text.replace(",", ""))


def _bytes_of(src: str) -> bytes:
    assert src.startswith("data:image/"), src[:40]
    return base64.b64decode(src.split(",", 1)[1])


def _member(tar_path, name) -> bytes:
    with tarfile.open(tar_path) as tar:
        return tar.extractfile(name).read()


@pytest.fixture
def corpus(tmp_path):
    return write_synthetic_corpus(tmp_path, samples=1500, rejected=400, per_shard=100, tar_shards=2, work=True)


def test_the_funnel_numbers_are_funnel_jsons(corpus):
    page = write_corpus_report(corpus).read_text(encoding="utf-8")
    funnel = json.loads((corpus / "funnel.json").read_text(encoding="utf-8"))
    found = elements(page)
    for stage in funnel["stages"]:
        row = with_attr(found, "data-stage", stage["stage"])
        assert len(row) == 1
        cells = [e for e in found[found.index(row[0]):] if "data-in" in e.attrs or "data-out" in e.attrs][:2]
        assert [_count(c.content) for c in cells] == [stage["in"], stage["out"]]
    shown = {}
    for row in with_attr(found, "data-reason"):
        if row.tag == "tr":
            cell = next(e for e in found[found.index(row):] if "data-count" in e.attrs)
            shown[row.attrs["data-reason"]] = _count(cell.content)
    assert shown == funnel["rejected_by_reason"] and len(shown) == 6
    totals = {e.attrs["data-total"]: _count(e.content) for e in with_attr(found, "data-total")}
    assert totals == {"input_rows": funnel["input_rows"], "samples": 1500, "rejected": 400}
    ids = [e.attrs["id"] for e in found if "id" in e.attrs]
    assert len(ids) == len(set(ids)) > 50  # the inline charts' ids do not collide


def test_thumbnails_are_the_shard_images_of_present_shards(corpus):
    page = write_corpus_report(corpus).read_text(encoding="utf-8")
    tiles = [e for e in with_attr(page, "data-key") if e.tag == "img"]
    assert 0 < len(tiles) <= 48
    for tile in tiles:
        key = tile.attrs["data-key"]
        assert int(key[:5]) < 2  # only the two shards on disk are sampled
        assert _bytes_of(tile.attrs["src"]) == _member(corpus.parent / "out" / "shards" / f"{key[:5]}.tar",
                                                       f"{key}.jpg")


def test_every_reason_has_an_example_and_a_duplicate_is_shown_beside_the_kept_image(corpus):
    page = write_corpus_report(corpus).read_text(encoding="utf-8")
    funnel = json.loads((corpus / "funnel.json").read_text(encoding="utf-8"))
    found = elements(page)
    examples = with_attr(found, "data-example")
    assert {e.attrs["data-example"] for e in examples} == set(funnel["rejected_by_reason"])
    near = [e for e in examples if e.attrs["data-example"] == "dedup:near_duplicate"][0]
    start = found.index(near)
    images = [e for e in found[start:start + 12] if e.tag == "img"][:2]
    uid = int(near.content.split("this row (uid ")[1].split(")")[0])
    kept = pl.read_parquet(corpus / "rejected" / "dedup.parquet").filter(pl.col("uid") == uid)["duplicate_of"][0]
    work = corpus.parent / "out" / "work" / "download"
    own = pl.read_parquet(work / "attempts.parquet").filter(pl.col("uid") == uid)["key"][0]
    assert _bytes_of(images[0].attrs["src"]) == _member(work / "00000.tar", f"{own}.jpg")
    if int(kept[:5]) < 2:
        assert _bytes_of(images[1].attrs["src"]) == _member(corpus.parent / "out" / "shards" / f"{kept[:5]}.tar",
                                                            f"{kept}.jpg")
    assert "pHash distance 3 to the kept image" in near.content
    text = [e for e in examples if e.attrs["data-example"] == "text:too_short"][0].content
    assert "猫 " in text and "→" in text  # raw, then normalized


def test_without_the_work_folder_the_duplicates_own_image_is_said_to_be_gone(tmp_path):
    manifests = write_synthetic_corpus(tmp_path, samples=300, rejected=60, tar_shards=1, work=False)
    page = write_corpus_report(manifests).read_text(encoding="utf-8")
    assert page.count("the build&#x27;s work folder is gone") >= 4  # every dedup example says so
    assert "<script" not in page and "<link" not in page
    assert not [e for e in elements(page) if e.attrs.get("src", "").startswith(("http", "//", "file"))]


def test_clip_scores_get_a_histogram_only_when_the_corpus_has_them(tmp_path):
    manifests = write_synthetic_corpus(tmp_path, samples=200, rejected=20, tar_shards=1)
    assert "no CLIP scores in this corpus" in write_corpus_report(manifests).read_text(encoding="utf-8")
    (manifests / "embeddings").mkdir()
    pl.DataFrame({"key": ["0000000", "0000001"], "uid": [0, 2], "clip_score": [0.21, 0.33]},
                 schema_overrides={"clip_score": pl.Float32}).write_parquet(manifests / "embeddings" / "00000.parquet")
    page = write_corpus_report(manifests).read_text(encoding="utf-8")
    assert "no CLIP scores" not in page and "CLIP score" in page


def test_corpus_report_command_writes_where_asked_and_refuses_a_folder_that_is_no_corpus(tmp_path, corpus):
    out = tmp_path / "elsewhere" / "r.html"
    result = runner.invoke(app, ["corpus", "report", str(corpus), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == f"report -> {out}"
    assert "<svg" in out.read_text(encoding="utf-8") and not (corpus / "report.html").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    result = runner.invoke(app, ["corpus", "report", str(empty)])
    assert result.exit_code == 2
    assert result.output.strip() == (f"error: {empty}/funnel.json: no funnel.json: not a built corpus "
                                     "(run `cnclip corpus build` first)")


def _write_run(run, versions=True):
    run.mkdir()
    records = []
    for stage, steps, offset in ((1, (10, 20, 30), 0), (2, (10, 20), 960)):
        for step in steps:
            records.append({"time": 1.0 + len(records), "event": "train", "stage": stage, "step": step,
                            "loss": 3.0 / (len(records) + 1), "lr": 1e-3 if step < 30 else 0.0,
                            "logit_scale": 14.0 + len(records), "samples": offset + step * 32,
                            "samples_per_s": 800.0, "data_wait": 0.1})
        records.append({"time": 50.0, "event": "eval", "stage": stage, "step": steps[-1], "set": "held-out",
                        "mean_recall": 40.0 + 10 * stage, "text_to_image_R@1": 10.0 * stage, "images": 50})
    lines = [json.dumps(r) for r in records] + ['{"time": 99, "event": "tra']  # a crash cut the last line
    (run / "log.jsonl").write_text("\n".join(lines), encoding="utf-8")
    record = {"format": "cnclip-run-1", "config": {"name": "tiny", "batch_size": 32}}
    if versions:
        record["versions"] = {"torch": "2.5.1", "open_clip_torch": "2.29.0"}
    (run / "run.json").write_text(json.dumps(record), encoding="utf-8")
    return records


def test_evaluations_land_on_the_train_records_samples_axis(tmp_path):
    records = _write_run(tmp_path / "run")
    axis = samples_axis(records)
    assert axis == {1: (0.0, 32.0), 2: (960.0, 32.0)}  # stage 2's step 0 is where stage 1 ended


def test_train_report_shows_the_last_evaluation_versions_and_the_stage_switch(tmp_path):
    _write_run(tmp_path / "run")
    page = write_train_report(tmp_path / "run").read_text(encoding="utf-8")
    found = elements(page)
    table = with_attr(found, "id", "eval-table")[0]
    cells = [e.content for e in found[found.index(table):] if e.tag in ("th", "td")][:10]
    assert cells == ["set", "stage", "step", "mean_recall", "text_to_image_R@1", "held-out", "2", "20", "60", "20"]
    assert "2.5.1" in with_attr(found, "id", "versions-table")[0].content
    assert page.count("stage 2</text>") >= 4  # the switch is marked on every curve (SVG text)
    assert "&quot;tiny&quot;" in page  # the resolved config
    ids = [e.attrs["id"] for e in found if "id" in e.attrs]
    assert len(ids) == len(set(ids))


def test_train_report_without_versions_says_so_and_a_missing_log_is_one_line(tmp_path):
    _write_run(tmp_path / "run", versions=False)
    result = runner.invoke(app, ["train", "report", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    assert "the run recorded no package versions" in (tmp_path / "run" / "report.html").read_text(encoding="utf-8")
    (tmp_path / "nolog").mkdir()
    result = runner.invoke(app, ["train", "report", str(tmp_path / "nolog")])
    assert result.exit_code == 2
    assert result.output.strip() == (f"error: {tmp_path}/nolog/log.jsonl: no run log here "
                                     "(a run's output_dir holds log.jsonl)")


@pytest.mark.slow
def test_a_build_writes_its_report_with_its_settings_and_clean_removes_it(tmp_path, web_root, web, make_recipe,
                                                                          capsys, monkeypatch):
    from PIL import Image

    from cnclip.corpus import build, clean

    (web_root / "img").mkdir()
    rows = []
    for i, rgb in enumerate([(200, 30, 30), (30, 200, 30)]):
        Image.new("RGB", (40, 40), rgb).save(web_root / "img" / f"{i}.png")
        rows.append({"url": f"{web.base_url}/img/{i}.png", "caption": f"第{i}张纯色的方形图片"})
    rows.append({"url": f"{web.base_url}/img/1.png", "caption": "第1张纯色的方形图片"})  # a duplicate pair
    pl.DataFrame(rows).write_csv(tmp_path / "list.csv")
    recipe = make_recipe([{"name": "csv", "kind": "metadata", "path": str(tmp_path / "list.csv")}])
    monkeypatch.setenv("CNCLIP_QUIET", "0")  # the path is printed as the build's info lines are
    build(recipe, show_funnel=False)
    monkeypatch.setenv("CNCLIP_QUIET", "1")
    report = recipe.manifest_dir / "report.html"
    summary = capsys.readouterr().err
    assert ["report", str(report)] in [line.split() for line in summary.splitlines()]  # the build's last lines
    page = report.read_text(encoding="utf-8")
    assert "&quot;min_side&quot;: 16" in page  # the recipe's settings
    assert [e.attrs["data-example"] for e in with_attr(page, "data-example")] == ["text:duplicate_pair"]
    clean(recipe)
    assert not report.exists() and not recipe.manifest_dir.exists()
    build(recipe, show_funnel=False)  # a folder left with a report would refuse this build as foreign
    assert report.is_file()


def test_a_damaged_manifest_part_or_funnel_is_one_line_not_a_traceback(tmp_path):
    manifests = write_synthetic_corpus(tmp_path, samples=200, rejected=20, tar_shards=1)
    part = manifests / "samples" / "00001.parquet"
    part.write_bytes(part.read_bytes()[:100])
    result = runner.invoke(app, ["corpus", "report", str(manifests)])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {manifests}: manifest parts unreadable (")
    assert lines[0].endswith(f"run `cnclip corpus verify {manifests}`")
    (manifests / "funnel.json").write_text("[1, 2]", encoding="utf-8")
    result = runner.invoke(app, ["corpus", "report", str(manifests)])
    assert result.output.strip() == f"error: {manifests}/funnel.json: not a build's funnel (no 'stages' list)"
