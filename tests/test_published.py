"""A published corpus: one schema per manifest folder, the README's snippets as written, and
damage (deleted, truncated, foreign files) found by `verify`, `stats` and a rerun of `build`.

One two-source build (the sample web, whose rows keep `case`, and a CSV over loopback keeping
`score`), with relative paths, so damage tests work on copies of it.
"""

import json
import os
import random
import re
import shutil
from pathlib import Path

import polars as pl
import pytest
import yaml
from typer.testing import CliRunner

from cnclip.cli import app
from cnclip.corpus import build, corpus_stats, load_recipe
from cnclip.corpus.manifests.schemas import REJECTED_SCHEMA, SAMPLE_SCHEMA
from cnclip.corpus.sources.sample_web import SampleWebServer, draw_shape
from conftest import REPO, free_port

pytestmark = pytest.mark.slow
runner = CliRunner()
MANIFESTS = Path("manifests/two")
SHARDS = Path("out/shards")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("published")
    site = root / "site"
    site.mkdir()
    for i in range(3):
        draw_shape((200, 60 * i, 30), "圆形", random.Random(i)).save(site / f"{i}.png")
    with SampleWebServer(site, port=0) as web:
        rows = [{"link": f"{web.base_url}/{i}.png", "alt": f"第{i}张红绿蓝圆形图片", "score": i} for i in range(3)]
        rows += [{"link": f"{web.base_url}/404.png", "alt": "一张不存在的图片啊", "score": 9},
                 {"link": f"{web.base_url}/0.png", "alt": "cat", "score": 7}]
        pl.DataFrame(rows).write_csv(root / "list.csv")
        recipe = {
            "name": "two", "output_dir": "out", "manifest_dir": str(MANIFESTS),
            "sources": [{"name": "web", "kind": "sample_web", "images": 30, "seed": 1, "port": free_port()},
                        {"name": "csv", "kind": "metadata", "path": "list.csv", "url_column": "link",
                         "caption_column": "alt", "keep_columns": ["score"]}],
            "image": {"size": 32, "min_side": 16},
            "download": {"processes": 1, "threads": 8, "timeout": 3, "retries": 0, "samples_per_part": 50,
                         "allow_networks": ["127.0.0.1/32"], "per_host_delay": 0, "per_host_concurrency": 64},
            "shard": {"samples_per_shard": 10, "processes": 1},
            "text": {"processes": 1},
            "dedup": {"processes": 1},
        }
        (root / "recipe.yaml").write_text(yaml.safe_dump(recipe, allow_unicode=True), encoding="utf-8")
        cwd = os.getcwd()
        os.chdir(root)
        try:
            funnel = build(load_recipe("recipe.yaml"), show_funnel=False)
        finally:
            os.chdir(cwd)
    return root, funnel


@pytest.fixture
def copy(corpus, tmp_path, monkeypatch):
    """A copy of the built corpus (same relative paths, same fingerprints), as the cwd."""
    root, funnel = corpus
    target = tmp_path / "copy"
    shutil.copytree(root, target, symlinks=True)
    monkeypatch.chdir(target)
    return target, funnel


def test_every_part_of_a_folder_has_the_declared_schema(corpus):
    root, funnel = corpus
    keep = {"case": pl.String, "score": pl.String}  # CSV columns are read as text
    for folder, base in (("samples", SAMPLE_SCHEMA), ("rejected", REJECTED_SCHEMA)):
        parts = sorted((root / MANIFESTS / folder).glob("*.parquet"))
        schemas = {tuple(pl.read_parquet_schema(p).items()) for p in parts}
        assert schemas == {tuple({**base, **keep}.items())}, folder
    # Parts of two sources with different keep_columns, and every stage's rejects, were written.
    names = [p.name for p in sorted((root / MANIFESTS / "rejected").glob("*.parquet"))]
    assert names == ["dedup.parquet", "download.parquet", "text-000-00000.parquet", "text-001-00000.parquet"]
    rejected = pl.read_parquet(root / MANIFESTS / "rejected" / "*.parquet")
    csv_rows = rejected.filter(pl.col("source") == "csv")
    assert csv_rows.sort("row").select("reason", "score", "case").rows() == [
        ("download:failed_to_download", "9", None), ("text:too_short", "7", None)]
    assert rejected.filter(pl.col("source") == "web")["score"].null_count() == rejected.height - 2
    assert rejected.height == funnel["rejected"]


def readme_snippets():
    text = (REPO / "manifests" / "README.md").read_text(encoding="utf-8")
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_the_manifest_readme_snippets_run_as_written(corpus, tmp_path, monkeypatch):
    root, funnel = corpus
    (tmp_path / "manifests").mkdir()
    (tmp_path / "manifests" / "demo").symlink_to(root / MANIFESTS)
    monkeypatch.chdir(tmp_path)
    snippets = readme_snippets()
    assert len(snippets) == 3
    expected = sorted(funnel["rejected_by_reason"].items(), key=lambda item: (-item[1], item[0]))
    polars_ns, duckdb_ns, arrow_ns = {}, {}, {}
    for snippet, namespace in zip(snippets, (polars_ns, duckdb_ns, arrow_ns), strict=True):
        exec(compile(snippet, "manifests/README.md", "exec"), namespace)
    assert polars_ns["by_reason"].rows() == expected
    assert polars_ns["samples"].height == funnel["samples"]
    assert duckdb_ns["by_reason"] == expected and duckdb_ns["samples"] == funnel["samples"]
    assert arrow_ns["samples"].num_rows == funnel["samples"]
    assert arrow_ns["rejected"].num_rows == funnel["rejected"]
    assert arrow_ns["rejected"].column_names == polars_ns["rejected"].columns


def test_verify_an_intact_corpus(corpus):
    root, funnel = corpus
    result = runner.invoke(app, ["corpus", "verify", str(root / MANIFESTS)])
    assert result.exit_code == 0, result.output
    files = len(json.loads((root / MANIFESTS / "checksums.json").read_text())["files"])
    tars = len(list((root / SHARDS).glob("*.tar")))
    assert files == 2 * tars + 1 + 4 + 1  # tars, sizes.json, sample parts, rejected parts, funnel.json
    assert result.output == (f"{root / MANIFESTS}: intact: {files} files match checksums.json; "
                             f"{funnel['samples']} samples + {funnel['rejected']} rejected = "
                             f"{funnel['input_rows']} input rows\n")


def error_lines(output):
    return [line.removeprefix("error: ") for line in output.splitlines() if line.strip()]


def test_a_deleted_and_a_truncated_shard_are_found_and_only_they_are_rebuilt(copy):
    target, funnel = copy
    tars = sorted(SHARDS.glob("*.tar"))
    originals = {t.name: t.read_bytes() for t in tars}
    assert len(tars) >= 3
    untouched = tars[2].stat().st_ino
    tars[0].unlink()
    with open(tars[1], "r+b") as stream:
        stream.truncate(1000)
    result = runner.invoke(app, ["corpus", "verify", str(MANIFESTS)])
    assert result.exit_code == 2
    size = len(originals[tars[1].name])
    assert error_lines(result.output) == [f"{tars[0]}: missing",
                                          f"{tars[1]}: 1000 bytes, checksums.json records {size} (truncated)"]
    # stats counts what is there and says the shards are damaged.
    assert corpus_stats(MANIFESTS)["problems"] == [
        f"{tars[0]}: missing", f"{tars[1]}: 1000 bytes, checksums.json records {size} (truncated)",
        f"run `cnclip corpus verify {MANIFESTS}` for a full check"]
    # A rerun does not call this up to date: it rewrites the two shards, byte for byte, and no other.
    rebuilt = build(load_recipe("recipe.yaml"), show_funnel=False)
    assert {**rebuilt, "shards_dir": None} == {**funnel, "shards_dir": None}
    assert {t.name: t.read_bytes() for t in sorted(SHARDS.glob("*.tar"))} == originals
    assert tars[2].stat().st_ino == untouched
    assert runner.invoke(app, ["corpus", "verify", str(MANIFESTS)]).exit_code == 0


def test_deleted_and_foreign_manifest_parts(copy):
    target, funnel = copy
    sample_part = MANIFESTS / "samples" / "00001.parquet"
    lost = pl.read_parquet(sample_part).height
    sample_part.unlink()
    stats = corpus_stats(MANIFESTS)
    assert stats["samples"] == funnel["samples"] - lost
    assert stats["problems"][:2] == [
        f"{MANIFESTS}: funnel.json counts {funnel['samples']} samples and {funnel['rejected']} rejected; "
        f"the manifests on disk hold {funnel['samples'] - lost} and {funnel['rejected']}",
        f"{sample_part}: missing"]
    shutil.copy(MANIFESTS / "rejected" / "dedup.parquet", MANIFESTS / "rejected" / "extra.parquet")
    dedup = pl.read_parquet(MANIFESTS / "rejected" / "dedup.parquet").height
    result = runner.invoke(app, ["corpus", "verify", str(MANIFESTS)])
    assert result.exit_code == 2
    assert error_lines(result.output) == [
        f"{sample_part}: missing",
        f"{MANIFESTS / 'rejected' / 'extra.parquet'}: not in checksums.json (not written by this build)",
        f"{MANIFESTS}: {funnel['input_rows']} input rows but {funnel['samples'] - lost} samples + "
        f"{funnel['rejected'] + dedup} rejected ({funnel['input_rows'] - lost} distinct rows)"]


def test_a_changed_byte_and_a_missing_record(copy):
    target, _ = copy
    part = MANIFESTS / "rejected" / "download.parquet"
    data = bytearray(part.read_bytes())
    data[len(data) // 2] ^= 0xFF
    part.write_bytes(bytes(data))
    result = runner.invoke(app, ["corpus", "verify", str(MANIFESTS)])
    assert result.exit_code == 2
    assert error_lines(result.output)[0] == f"{part}: SHA-256 differs from checksums.json (changed)"
    (MANIFESTS / "checksums.json").unlink()
    result = runner.invoke(app, ["corpus", "verify", str(MANIFESTS)])
    assert result.exit_code == 2
    assert error_lines(result.output) == [f"{MANIFESTS / 'checksums.json'}: missing (not a finished build)"]


def test_fresh_rebuild_removes_only_what_the_build_made(copy):
    target, funnel = copy
    (target / "out" / "notes.txt").write_text("mine")
    (MANIFESTS / "README.md").write_text("mine")
    (target / "manifests" / "other").mkdir()
    # Left-overs inside the build's own folders go with them.
    (target / "out" / "work" / "stale.txt").write_text("old")
    (MANIFESTS / "samples" / "stale.parquet").write_bytes(b"old")
    result = runner.invoke(app, ["corpus", "build", "recipe.yaml", "--fresh"])
    assert result.exit_code == 0, result.output
    assert (target / "out" / "notes.txt").read_text() == "mine" and (MANIFESTS / "README.md").read_text() == "mine"
    assert (target / "manifests" / "other").is_dir()
    assert not (target / "out" / "work" / "stale.txt").exists()
    assert not (MANIFESTS / "samples" / "stale.parquet").exists()
    assert runner.invoke(app, ["corpus", "verify", str(MANIFESTS)]).exit_code == 0
