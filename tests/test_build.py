"""End-to-end builds over servers on 127.0.0.1: exact survivors, exact reasons, bytes in the tars."""

import hashlib
import io
import json
import tarfile
import time

import polars as pl
import pytest
from PIL import Image

from cnclip.corpus import build, corpus_stats
from cnclip.corpus.sources.sample_web import draw_shape
from conftest import free_port

pytestmark = pytest.mark.slow

# The outcome each case of the sample web must have after a build with recipes/demo.yaml's settings.
EXPECTED_REASON = {
    "plain": None,
    "traditional": None,
    "full_width": None,
    "entities": None,
    "duplicate_row_first": None,
    "duplicate_row_again": "text:duplicate_pair",
    "english": "text:not_chinese",
    "boilerplate": "text:blacklisted",
    "file_name": "text:filename_or_url",
    "bare_url": "text:filename_or_url",
    "too_short": "text:too_short",
    "too_long": "text:too_long",
    "repeated_caption": "text:repeated_caption",
    "exact_copy": "dedup:exact_duplicate",
    "near_copy": "dedup:near_duplicate",
    "missing_file": "download:failed_to_download",
    "no_ai": "download:failed_to_download",
    "never_answers": "network:timeout",
    "html_page": "download:failed_to_resize",
    "truncated": "download:failed_to_resize",
    "bomb": "download:failed_to_resize",
    "tiny": "download:failed_to_resize",
    "elongated": "download:failed_to_resize",
}


def read_manifests(manifest_dir):
    samples = pl.read_parquet(manifest_dir / "samples" / "*.parquet")
    rejected = pl.concat([pl.read_parquet(p) for p in sorted((manifest_dir / "rejected").glob("*.parquet"))],
                         how="diagonal_relaxed")
    return samples, rejected


def read_tar(path):
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]


@pytest.fixture(scope="module")
def demo_build(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    from cnclip.corpus.recipe import parse_recipe

    recipe = parse_recipe(
        {
            "name": "demo-test",
            "output_dir": str(root / "out"),
            "manifest_dir": str(root / "manifests"),
            "sources": [{"name": "web", "kind": "sample_web", "images": 80, "seed": 3, "port": free_port()}],
            "image": {"size": 64, "min_side": 64, "max_aspect_ratio": 3.0},
            "download": {"processes": 2, "threads": 8, "timeout": 3, "retries": 0, "samples_per_part": 40,
                         "allow_networks": ["127.0.0.0/8"], "per_host_delay": 0, "per_host_concurrency": 16},
            "shard": {"samples_per_shard": 25, "processes": 2},
            "text": {"max_caption_repeats": 10, "processes": 1},
        }
    )
    started = time.monotonic()
    funnel = build(recipe, show_funnel=False)
    return recipe, funnel, time.monotonic() - started


def test_every_case_ends_where_it_should(demo_build):
    recipe, funnel, _ = demo_build
    samples, rejected = read_manifests(recipe.manifest_dir)
    outcomes = pl.concat([samples.select("uid", "case", pl.lit(None, pl.String).alias("reason")),
                          rejected.select("uid", "case", "reason")])
    assert outcomes["uid"].n_unique() == outcomes.height == funnel["input_rows"]
    wrong = outcomes.filter(pl.col("reason").ne_missing(pl.col("case").replace_strict(EXPECTED_REASON)))
    assert wrong.height == 0, wrong
    # Every kind of case was exercised.
    assert set(outcomes["case"]) == set(EXPECTED_REASON)
    assert funnel["samples"] == samples.height and funnel["rejected"] == rejected.height


def test_normalized_captions_and_img2dataset_messages(demo_build):
    recipe, _, _ = demo_build
    samples, rejected = read_manifests(recipe.manifest_dir)
    traditional = samples.filter(pl.col("case") == "traditional").row(0, named=True)
    assert traditional["caption_raw"].startswith("一個") and traditional["caption"].startswith("一个")
    full_width = samples.filter(pl.col("case") == "full_width").row(0, named=True)
    assert full_width["caption"].startswith("2023年 ") and full_width["caption"].endswith(" HD")
    details = dict(rejected.filter(pl.col("stage") == "download").select("case", "detail").unique("case").rows())
    assert details["missing_file"] == "HTTP Error 404: Not Found"
    assert "X-Robots-Tag" in details["no_ai"]
    assert "cnclip-guard network:timeout" in details["never_answers"]
    assert details["tiny"] == "image too small"
    assert details["elongated"] == "aspect ratio too large"
    assert "CV_IO_MAX_IMAGE_PIXELS" in details["bomb"]
    # Copies name the sample they duplicate, by key.
    copies = rejected.filter(pl.col("stage") == "dedup")
    kept = samples.filter(pl.col("key").is_in(copies["duplicate_of"].implode()))
    assert kept.height == copies.height and set(kept["case"]) == {"plain"}
    exact = copies.filter(pl.col("reason") == "dedup:exact_duplicate").join(
        samples.select(pl.col("key").alias("duplicate_of"), pl.col("sha256").alias("kept_sha256")), on="duplicate_of")
    assert (exact["sha256"] == exact["kept_sha256"]).all()


def test_tars_hold_exactly_the_manifest(demo_build):
    recipe, funnel, _ = demo_build
    samples, _ = read_manifests(recipe.manifest_dir)
    shards_dir = recipe.output_dir / "shards"
    sizes = json.loads((shards_dir / "sizes.json").read_text())
    tars = sorted(shards_dir.glob("*.tar"))
    assert [t.name for t in tars] == sorted(sizes)
    assert sum(sizes.values()) == samples.height == funnel["samples"]
    assert all(n == 25 for n in list(sizes.values())[:-1])
    by_key = {row["key"]: row for row in samples.iter_rows(named=True)}
    seen = []
    for tar in tars:
        members = read_tar(tar)
        assert len(members) == 3 * sizes[tar.name]
        for (jpg_name, jpg), (json_name, meta), (txt_name, txt) in zip(*[iter(members)] * 3, strict=False):
            key = jpg_name.removesuffix(".jpg")
            assert (json_name, txt_name) == (f"{key}.json", f"{key}.txt")
            row = by_key[key]
            assert row["shard"] == int(tar.stem) and key.startswith(tar.stem)
            assert txt.decode("utf-8") == row["caption"]
            metadata = json.loads(meta)
            assert metadata["uid"] == row["uid"] and metadata["sha256"] == row["sha256"]
            assert metadata["caption_raw"] == row["caption_raw"] and metadata["case"] == row["case"]
            image = Image.open(io.BytesIO(jpg))
            assert image.format == "JPEG" and image.size == (64, 64) == (row["width"], row["height"])
            seen.append(row["uid"])
    # Keys follow uid order: source order, then row order.
    assert seen == sorted(seen) == samples.sort("key")["uid"].to_list()


def test_sha256_is_of_the_original_bytes(demo_build):
    recipe, _, _ = demo_build
    samples, _ = read_manifests(recipe.manifest_dir)
    site = recipe.output_dir / "sample_web" / "web" / "site"
    for row in samples.head(10).iter_rows(named=True):
        path = row["url"].split("/", 3)[3]
        assert hashlib.sha256((site / path).read_bytes()).hexdigest() == row["sha256"]
        assert (row["original_width"], row["original_height"]) == (128, 128)


def test_funnel_and_stats(demo_build):
    recipe, funnel, elapsed = demo_build
    on_disk = json.loads((recipe.manifest_dir / "funnel.json").read_text())
    assert on_disk == funnel
    stages = {s["stage"]: s for s in funnel["stages"]}
    assert stages["text"]["in"] == funnel["input_rows"]
    assert stages["download"]["out"] == stages["dedup"]["in"]
    assert stages["dedup"]["out"] == stages["shard"]["out"] == funnel["samples"]
    assert stages["dedup"]["rejected"] == {"dedup:exact_duplicate": 2, "dedup:near_duplicate": 4}
    assert stages["text"]["rejected"]["text:repeated_caption"] == 15
    assert stages["download"]["rejected"]["download:failed_to_download"] == 8 + 2
    assert stages["download"]["rejected"]["network:timeout"] == 1
    stats = corpus_stats(recipe.manifest_dir)
    assert stats["samples"] == funnel["samples"]
    assert stats["rejected_by_reason"] == funnel["rejected_by_reason"]
    assert stats["problems"] == []  # an intact build: what funnel.json says is what is on disk
    assert 5 <= stats["caption_chars"]["p0"] <= stats["caption_chars"]["p100"] <= 50
    # The URL that never answers costs the 3 s timeout, not a stalled build.
    assert elapsed < 120


def test_stats_table_goes_to_stdout_and_errors_to_stderr(demo_build, tmp_path):
    """`cnclip corpus stats DIR > file` keeps the tables; a bad folder's error is not in the file."""
    import subprocess
    import sys

    recipe, funnel, _ = demo_build
    out = tmp_path / "stats.txt"
    with open(out, "w", encoding="utf-8") as stream:
        done = subprocess.run([sys.executable, "-m", "cnclip.cli", "corpus", "stats", str(recipe.manifest_dir)],
                              stdout=stream, stderr=subprocess.PIPE, text=True, timeout=120)
    assert done.returncode == 0 and done.stderr == ""
    text = out.read_text(encoding="utf-8")
    assert f"{funnel['samples']} samples, {sum(funnel['rejected_by_reason'].values())} rejected" in text
    assert f"corpus: {recipe.manifest_dir}" in text
    for reason, count in funnel["rejected_by_reason"].items():
        assert any(f"rejected {reason}" in line and line.rstrip(" │").endswith(str(count)) for line in text.splitlines())
    missing = subprocess.run([sys.executable, "-m", "cnclip.cli", "corpus", "stats", str(tmp_path / "nowhere")],
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and missing.stdout == ""
    assert missing.stderr.startswith("error: ") and "no samples/ or rejected/ manifests" in missing.stderr


def test_metadata_source_over_loopback(tmp_path, web_root, web, make_recipe):
    (web_root / "img").mkdir()
    rows = []
    for i, color in enumerate([(200, 30, 30), (30, 200, 30), (30, 30, 200)]):
        draw_shape(color, "圆形", __import__("random").Random(i)).save(web_root / f"img/{i}.png")
        rows.append({"link": f"{web.base_url}/img/{i}.png", "alt": f"第{i}张红绿蓝圆形图片", "score": i / 10})
    rows.append({"link": f"{web.base_url}/img/404.png", "alt": "一张不存在的图片啊", "score": 0.9})
    pl.DataFrame(rows).write_csv(tmp_path / "list.csv")
    recipe = make_recipe([{"name": "csv", "kind": "metadata", "path": str(tmp_path / "list.csv"),
                           "url_column": "link", "caption_column": "alt", "keep_columns": ["score"],
                           "where": "CAST(score AS DOUBLE) < 0.95"}])
    funnel = build(recipe, show_funnel=False)
    samples, rejected = read_manifests(recipe.manifest_dir)
    assert funnel["samples"] == 3 and rejected["reason"].to_list() == ["download:failed_to_download"]
    # No dedup rejects: their part is still there, with 0 rows and the one rejected schema.
    dedup = pl.read_parquet(recipe.manifest_dir / "rejected" / "dedup.parquet")
    assert dedup.height == 0 and dedup.schema == rejected.schema
    assert sorted(p.name for p in (recipe.manifest_dir / "rejected").iterdir()) == ["dedup.parquet",
                                                                                  "download.parquet"]
    assert samples["score"].to_list() == ["0.0", "0.1", "0.2"]
    for row in samples.iter_rows(named=True):
        original = (web_root / "img" / f"{row['row']}.png").read_bytes()
        assert row["sha256"] == hashlib.sha256(original).hexdigest()
    members = dict(read_tar(recipe.output_dir / "shards" / "00000.tar"))
    meta = json.loads(members[f"{samples['key'][0]}.json"])
    assert meta["score"] == "0.0" and meta["source"] == "csv"
