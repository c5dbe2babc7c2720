"""Dedup inside real builds: near copies made by the test, process counts, decontamination."""

import io
import json

import polars as pl
import pytest
from PIL import Image, ImageDraw
from typer.testing import CliRunner

from cnclip.cli import app
from cnclip.corpus import build
from test_hashing import textured

pytestmark = pytest.mark.slow

DISTINCT = 30


def jpeg(image, quality=90):
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def near_copies(image):
    side = image.size[0]
    marked = image.copy()
    ImageDraw.Draw(marked).text((6, side - 16), "sample.cn", fill=(255, 255, 255))
    return {
        "quality50": jpeg(image, 50),
        "resized90": jpeg(image.resize((side * 9 // 10, side * 9 // 10), Image.Resampling.LANCZOS)),
        "cropped": jpeg(image.crop((2, 2, side - 2, side - 2))),
        "text": jpeg(marked),
    }


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """30 distinct pictures, then 4 near copies of picture 0..3 and a byte copy of picture 4."""
    from cnclip.corpus.sources.sample_web import SampleWebServer

    root = tmp_path_factory.mktemp("site")
    rows, expected = [], {}
    originals = [textured(seed, 512) for seed in range(DISTINCT)]
    for i, image in enumerate(originals):
        (root / f"{i}.jpg").write_bytes(jpeg(image))
        rows.append((f"{i}.jpg", f"第{i}张不同的图片"))
    for source, kind in enumerate(["quality50", "resized90", "cropped", "text"]):  # copy i is of picture i
        data = near_copies(originals[source])[kind]
        (root / f"copy-{kind}.jpg").write_bytes(data)
        expected[len(rows)] = ("dedup:near_duplicate", source)
        rows.append((f"copy-{kind}.jpg", f"转载的图片{kind}版本"))
    (root / "copy-exact.jpg").write_bytes((root / "4.jpg").read_bytes())
    expected[len(rows)] = ("dedup:exact_duplicate", 4)
    rows.append(("copy-exact.jpg", "原样转载的第四张图片"))
    with SampleWebServer(root) as server:
        listing = root.parent / f"{root.name}.csv"
        pl.DataFrame({"url": [f"{server.base_url}/{p}" for p, _ in rows],
                      "caption": [c for _, c in rows]}).write_csv(listing)
        yield root, listing, originals, expected


def recipe_for(make_recipe, listing, processes, **dedup):
    return make_recipe(
        [{"name": "site", "kind": "metadata", "path": str(listing)}],
        image={"size": 128, "min_side": 16},
        download={"processes": processes, "threads": 4, "samples_per_part": 10},
        dedup={"processes": processes, **dedup},
        shard={"processes": processes, "samples_per_shard": 8},
        text={"processes": processes},
    )


def outcome(recipe):
    samples = pl.read_parquet(recipe.manifest_dir / "samples" / "*.parquet")
    dedup = pl.read_parquet(recipe.manifest_dir / "rejected" / "dedup.parquet")
    return samples, dedup


def test_near_copies_go_and_distinct_pictures_stay(site, make_recipe):
    _, listing, _, expected = site
    recipe = recipe_for(make_recipe, listing, processes=1)
    build(recipe, show_funnel=False)
    samples, dedup = outcome(recipe)
    assert sorted(samples["row"].to_list()) == list(range(DISTINCT))
    key_of_row = dict(samples.select("row", "key").rows())
    got = {row: (reason, key) for row, reason, key in dedup.select("row", "reason", "duplicate_of").rows()}
    assert got == {row: (reason, key_of_row[source]) for row, (reason, source) in expected.items()}
    assert all(len(h) == 16 for h in samples["phash"])


def test_same_kept_set_whatever_the_process_count(site, make_recipe, tmp_path_factory):
    _, listing, _, _ = site
    results = []
    for processes in (1, 2):
        folder = tmp_path_factory.mktemp(f"p{processes}")
        recipe = recipe_for(make_recipe, listing, processes).model_copy(
            update={"output_dir": folder / "out", "manifest_dir": folder / "manifests"})
        build(recipe, show_funnel=False)
        samples, dedup = outcome(recipe)
        results.append((samples.select("key", "uid", "phash", "sha256").sort("key"),
                        dedup.select("uid", "reason", "duplicate_of").sort("uid")))
    assert results[0][0].equals(results[1][0]) and results[0][1].equals(results[1][1])


def test_decontamination_from_folders_and_shared_lists(site, make_recipe, tmp_path):
    _, listing, originals, _ = site
    evalset = tmp_path / "evalset"
    evalset.mkdir()
    for i in (5, 6):  # the evaluation set has the full-size originals, as PNG
        originals[i].save(evalset / f"img{i}.png")
    recipe = recipe_for(make_recipe, listing, processes=1)
    build(recipe, show_funnel=False)
    download_record = json.loads((recipe.output_dir / "work" / "download.state.json").read_text())

    with_folder = recipe.model_copy(update={"dedup": recipe.dedup.model_copy(update={"eval_images": [str(evalset)]})})
    build(with_folder, show_funnel=False)
    # Only dedup and shard were redone: the download record is untouched.
    assert json.loads((recipe.output_dir / "work" / "download.state.json").read_text()) == download_record
    _, dedup = outcome(with_folder)
    overlap = dedup.filter(pl.col("reason") == "dedup:eval_overlap")
    assert overlap.select("row", "duplicate_of").sort("row").rows() == [
        (5, f"{evalset}:img5.png"), (6, f"{evalset}:img6.png")]

    hashes = tmp_path / "evalset.parquet"
    result = CliRunner().invoke(app, ["corpus", "hash-eval", str(evalset), "--out", str(hashes), "--size", "128"])
    assert result.exit_code == 0, result.output
    assert pl.read_parquet(hashes)["id"].to_list() == ["img5.png", "img6.png"]
    with_list = recipe.model_copy(update={"dedup": recipe.dedup.model_copy(update={"eval_images": [str(hashes)]})})
    build(with_list, show_funnel=False)
    _, dedup = outcome(with_list)
    assert dedup.filter(pl.col("reason") == "dedup:eval_overlap")["row"].sort().to_list() == [5, 6]

    wrong_size = tmp_path / "wrong.parquet"
    CliRunner().invoke(app, ["corpus", "hash-eval", str(evalset), "--out", str(wrong_size), "--size", "224"])
    mismatched = recipe.model_copy(update={"dedup": recipe.dedup.model_copy(update={"eval_images": [str(wrong_size)]})})
    with pytest.raises(ValueError, match="hashed at size 224 with center_crop"):
        build(mismatched, show_funnel=False)
