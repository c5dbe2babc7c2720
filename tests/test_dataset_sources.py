"""The dataset source kinds (coco, visual_genome, cn_clip / muge / flickr30k_cn / coco_cn): files
made here, built end to end, rows traced to samples/ or rejected/ and images to the shards."""

from __future__ import annotations

import tarfile
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from cnclip.corpus.recipe import RecipeError, parse_recipe
from cnclip.corpus.sources.metadata import SourceError
from dataset_files import jpeg_bytes, mean_colour, tsv_line, write_cn_clip, write_coco, write_visual_genome

COCO_SEEDS = {1: 11, 2: 12, 3: 13, 4: 11}  # image 4: the same file as image 1
COCO_CAPTIONS = [(1, "一只红色的猫在睡觉"), (2, "蓝天下的一座白色房子"), (1, "沙发上躺着一只小猫"),
                 (3, "这张图片的文件不见了"), (99, "没有这张图片的编号啊"), (2, 12345),
                 (4, "复制的图片的第一句"), (4, "复制的图片的第二句")]
VG_SEEDS = {7: 21, 8: 22, 9: 23}
VG_REGIONS = {7: ["红色的圆", "蓝色的方块", "红色的圆", "  绿色的  三角 "], 8: ["一棵高高的树木"], 9: ["", "  "]}
CN_SEEDS = {10: 31, 11: 32, 13: 33}


def _cn_clip_lines():
    tsv = [tsv_line(10, CN_SEEDS[10]), tsv_line(11, CN_SEEDS[11], urlsafe=True), "12\t!!!这不是base64!!!",
           "no tab on this line", tsv_line(13, CN_SEEDS[13])]
    texts = [{"text_id": 1, "text": "两张图片共用的描述文字", "image_ids": [10, 11]},
             {"text_id": 2, "text": "图片数据坏了的一行文字", "image_ids": [12]},
             {"text_id": 3, "text": "指向不存在的图片编号", "image_ids": [404]},
             "{not json",
             {"text_id": 5, "text": "只有查询没有图片的文字"},
             {"text_id": 6, "text": "第三张图片的中文描述", "image_ids": [13]}]
    return tsv, texts


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    from cnclip.corpus import build

    root = tmp_path_factory.mktemp("datasets")
    coco = write_coco(root / "coco", COCO_SEEDS, COCO_CAPTIONS, missing=(3,))
    vg = write_visual_genome(root, VG_SEEDS, VG_REGIONS)
    tsv, texts = _cn_clip_lines()
    muge = write_cn_clip(root / "muge", "valid", tsv, texts)
    data = {
        "name": "datasets", "output_dir": str(root / "out"), "manifest_dir": str(root / "manifests"),
        "sources": [
            {"name": "coco", "kind": "coco", "annotations": str(coco), "images": str(root / "coco" / "images")},
            {"name": "vg", "kind": "visual_genome", "regions": str(vg), "images": str(root / "vg"), "separator": "；"},
            {"name": "muge", "kind": "muge", "path": str(muge), "split": "valid"},
        ],
        # No download.allow_local_files: the stored images are in the build's own folder.
        "download": {"processes": 1, "threads": 4, "timeout": 3, "retries": 0, "samples_per_part": 50},
        "image": {"size": 32, "min_side": 16},
        "shard": {"samples_per_shard": 4, "processes": 1},
        "text": {"processes": 1},
    }
    recipe = parse_recipe(data, "datasets")
    build(recipe, show_funnel=False)
    return root, recipe


def _manifests(manifest_dir: Path):
    samples = pl.read_parquet(Path(manifest_dir) / "samples" / "*.parquet")
    rejected = pl.concat([pl.read_parquet(p) for p in sorted((Path(manifest_dir) / "rejected").glob("*.parquet"))],
                         how="diagonal_relaxed")
    return samples, rejected


def _shard_images(output_dir: Path) -> dict[str, bytes]:
    images = {}
    for shard in sorted((Path(output_dir) / "shards").glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".jpg"):
                    images[member.name.removesuffix(".jpg")] = tar.extractfile(member).read()
    return images


def test_every_row_is_in_samples_or_rejected_with_its_reason(built):
    root, recipe = built
    samples, rejected = _manifests(recipe.manifest_dir)
    kept = {(r["source"], r["caption"], r["image_id"]) for r in samples.iter_rows(named=True)}
    assert kept == {("coco", "一只红色的猫在睡觉", 1), ("coco", "沙发上躺着一只小猫", 1), ("coco", "蓝天下的一座白色房子", 2),
                    ("vg", "红色的圆;蓝色的方块;绿色的 三角", 7), ("vg", "一棵高高的树木", 8),
                    ("muge", "两张图片共用的描述文字", 10), ("muge", "两张图片共用的描述文字", 11),
                    ("muge", "第三张图片的中文描述", 13)}
    assert samples.filter(pl.col("source") == "muge").sort("image_id")["text_id"].to_list() == [1, 1, 6]
    got = {(r["source"], r["reason"], r["detail"]) for r in rejected.iter_rows(named=True) if r["stage"] != "dedup"}
    assert got == {
        ("coco", "ingest:bad_row", f"captions.json: annotations[3]: images[2] (id 3): no file "
                                   f"'COCO_val2014_000000000003.jpg' in {root / 'coco' / 'images'}"),
        ("coco", "ingest:bad_row", "captions.json: annotations[4]: image_id 99 is not in images"),
        ("coco", "ingest:caption_not_text", "captions.json: annotations[5]: caption is not a string"),
        ("vg", "ingest:bad_row", "region_descriptions.json: [2] (image 9): no region phrase"),
        ("muge", "ingest:bad_row", "valid_texts.jsonl line 2: valid_imgs.tsv line 3: image 12 is not valid base64"),
        ("muge", "ingest:bad_row", "valid_texts.jsonl line 3: image id 404 is not in valid_imgs.tsv (1 unreadable "
                                   "line(s) there, the first line 4)"),
        ("muge", "ingest:bad_row", "valid_texts.jsonl line 4: not valid JSON (Expecting property name enclosed in "
                                   "double quotes: line 1 column 2 (char 1))"),
        ("muge", "ingest:bad_row", "valid_texts.jsonl line 5: no key 'image_ids' (a query without its images)"),
    }
    # Input rows: 8 captions + 3 VG images + (2 + 1 + 1 + 1 + 1 + 1) pairs or bad text lines.
    assert samples.height + rejected.height == 8 + 3 + 7
    assert samples["uid"].is_unique().all() and not set(samples["uid"]) & set(rejected["uid"])


def test_captions_of_one_image_are_kept_together_and_dropped_together(built):
    """Two captions of image 1 are one image, not duplicates; image 4 (the same file) is a copy
    of it: both its captions are dropped, naming image 1's first row."""
    _, recipe = built
    samples, rejected = _manifests(recipe.manifest_dir)
    assert samples.filter(pl.col("image_id") == 1).height == 2
    dropped = rejected.filter(pl.col("stage") == "dedup")
    first = samples.filter(pl.col("caption") == "一只红色的猫在睡觉")["key"].item()
    assert sorted(dropped.select("source", "image_id", "reason", "duplicate_of").rows()) == [
        ("coco", 4, "dedup:exact_duplicate", first)] * 2


def test_shards_hold_each_rows_own_image(built):
    _, recipe = built
    samples, _ = _manifests(recipe.manifest_dir)
    images = _shard_images(recipe.output_dir)
    assert set(images) == set(samples["key"])
    seeds = {"coco": COCO_SEEDS, "vg": VG_SEEDS, "muge": CN_SEEDS}
    for row in samples.iter_rows(named=True):
        expected = mean_colour(jpeg_bytes(seeds[row["source"]][row["image_id"]]))
        own = seeds[row["source"]][row["image_id"]]
        others = [mean_colour(jpeg_bytes(s)) for table in seeds.values() for s in table.values() if s != own]
        got = mean_colour(images[row["key"]])
        assert np.abs(got - expected).max() < 6, row
        assert min(np.abs(got - other).max() for other in others) > 6


def test_images_are_stored_once_in_the_builds_folder_and_reused(built):
    from cnclip.corpus import build

    _, recipe = built
    stored = Path(recipe.output_dir) / "work" / "sources"
    assert sorted(p.name for p in (stored / "muge" / "images").iterdir()) == ["10.jpg", "11.jpg", "13.jpg"]
    assert sorted(p.name for p in (stored / "coco" / "images").iterdir()) == ["1.jpg", "2.jpg", "4.jpg"]
    assert (stored / "muge" / "images" / "11.jpg").read_bytes() == jpeg_bytes(CN_SEEDS[11])
    before = {p: p.stat().st_mtime_ns for p in stored.rglob("*") if p.is_file()}
    build(recipe, show_funnel=False)
    assert {p: p.stat().st_mtime_ns for p in stored.rglob("*") if p.is_file()} == before


def test_a_file_url_outside_the_builds_folder_is_still_refused():
    from cnclip.corpus.recipe import TextSettings
    from cnclip.corpus.stages.text import per_row_reason

    own = "file:///data/out/work/sources/"
    frame = pl.DataFrame({"url": [own + "coco/images/1.jpg", "file:///etc/passwd", "FILE:///data/out/x.jpg"],
                          "caption": ["一只红色的猫在睡觉"] * 3})
    reasons = frame.select(per_row_reason(TextSettings(), [], False, own))["reason"].to_list()
    assert reasons == [None, "ingest:local_file_not_allowed", "ingest:local_file_not_allowed"]


def test_coco_images_from_urls_and_a_crafted_file_name(tmp_path):
    import json

    from cnclip.corpus.sources.coco import read_coco

    path = tmp_path / "c.json"
    images = [{"id": 1, "file_name": "a.jpg", "coco_url": "http://images.example/1.jpg"},
              {"id": 2, "file_name": "b.jpg", "flickr_url": "http://farm.example/2.jpg"},
              {"id": 3, "file_name": "c.jpg"}]
    captions = [{"image_id": i, "caption": f"图片{i}的描述"} for i in (1, 2, 3)]
    path.write_text(json.dumps({"images": images, "annotations": captions}), encoding="utf-8")
    rows = read_coco(str(path), "url", tmp_path / "work")
    assert rows["url"].to_list() == ["http://images.example/1.jpg", "http://farm.example/2.jpg", None]
    assert rows["detail"][2] == "c.json: annotations[2]: images[2] (id 3) has no coco_url or flickr_url"
    assert not (tmp_path / "work").exists()

    (tmp_path / "secret.jpg").write_bytes(jpeg_bytes(1))
    (tmp_path / "images").mkdir()
    images = [{"id": 1, "file_name": "../secret.jpg"}]
    path.write_text(json.dumps({"images": images, "annotations": captions[:1]}), encoding="utf-8")
    rows = read_coco(str(path), str(tmp_path / "images"), tmp_path / "work")
    assert rows["reason"].to_list() == ["ingest:bad_row"] and rows["url"].to_list() == [None]
    assert not (tmp_path / "work" / "images").exists()


@pytest.mark.parametrize("content, message", [
    ({"images": []}, "c.json: no key 'annotations'"),
    ({"images": [{"file_name": "a.jpg"}], "annotations": []}, "c.json: images[0] has no key 'id'"),
    ({"images": [{"id": 1}], "annotations": [{"image_id": 1}]}, "c.json: annotations[0] has no key 'caption'"),
    ({"images": {}, "annotations": []}, "c.json: images is not a list"),
])
def test_a_missing_json_key_is_one_line_naming_file_and_key(tmp_path, content, message):
    import json

    from cnclip.corpus.sources.coco import read_coco

    path = tmp_path / "c.json"
    path.write_text(json.dumps(content), encoding="utf-8")
    with pytest.raises(SourceError) as err:
        read_coco(str(path), "url", tmp_path / "work")
    assert str(err.value) == f"{tmp_path}/{message}"


def test_visual_genome_region_without_phrase_key_names_it(tmp_path):
    from cnclip.corpus.sources.visual_genome import read_visual_genome

    path = tmp_path / "region_descriptions.json"
    path.write_text('[{"id": 1, "regions": [{"phrase": "树"}, {"region_id": 5}]}]', encoding="utf-8")
    (tmp_path / "img").mkdir()
    with pytest.raises(SourceError) as err:
        read_visual_genome(str(path), str(tmp_path / "img"), None, tmp_path / "work", "; ")
    assert str(err.value) == f"{path}: [0].regions[1] has no key 'phrase'"


@pytest.mark.parametrize("content, message", [
    ('{"regions": []}', "the top level is not a list"),
    ('[{"id": 1, "regions": []}, 7]', "[1] is not a JSON object"),
    ('[{"id": 1, "regions": [{"phrase": "树"}]}, {"id": 2,', "not valid JSON ("),
    ("", "not valid JSON ("),
])
def test_visual_genome_malformed_json_is_one_line_naming_the_file(tmp_path, content, message):
    from cnclip.corpus.sources.visual_genome import read_visual_genome

    path = tmp_path / "region_descriptions.json"
    path.write_text(content, encoding="utf-8")
    (tmp_path / "img").mkdir()
    with pytest.raises(SourceError) as err:
        read_visual_genome(str(path), str(tmp_path / "img"), None, tmp_path / "work", "; ")
    assert str(err.value).startswith(f"{path}: {message}") and "\n" not in str(err.value)


def test_visual_genome_is_read_entry_by_entry_not_whole(tmp_path):
    """A 10 MB region file (100 images x 1,000 regions) is read holding about one entry: json.load
    of it peaks at ~70 MiB of Python objects (100,000 region objects at once)."""
    import json
    import tracemalloc

    from cnclip.corpus.sources.visual_genome import read_visual_genome

    path = tmp_path / "region_descriptions.json"
    regions = [{"region_id": i, "image_id": 0, "phrase": f"一棵树 {i % 3}", "x": i, "y": i, "width": 8, "height": 8}
               for i in range(1000)]
    with path.open("w", encoding="utf-8") as out:
        out.write("[" + ",".join(json.dumps({"id": image_id, "regions": regions}, ensure_ascii=False)
                                 for image_id in range(100)) + "]")
    assert path.stat().st_size > 9_000_000
    (tmp_path / "img").mkdir()
    tracemalloc.start()
    try:
        rows = read_visual_genome(str(path), str(tmp_path / "img"), None, tmp_path / "work", "; ")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert rows.height == 100 and rows["caption_raw"][0] == "一棵树 0; 一棵树 1; 一棵树 2"
    assert peak < 20 * 2**20, f"peak {peak / 2**20:.0f} MiB of Python objects"


def test_recipe_names_a_missing_dataset_file(tmp_path):
    data = {"name": "x", "output_dir": str(tmp_path / "o"), "manifest_dir": str(tmp_path / "m"),
            "sources": [{"name": "f", "kind": "flickr30k_cn", "path": str(tmp_path), "split": "test"},
                        {"name": "v", "kind": "visual_genome", "regions": str(tmp_path / "r.json"), "images": "url"}]}
    with pytest.raises(RecipeError) as err:
        parse_recipe(data, "r.yaml")
    assert str(err.value).startswith("r.yaml: sources[1]: Value error, images: url reads the URLs from "
                                     "image_data.json; set image_data (got ")
    data["sources"][1]["image_data"] = str(tmp_path / "image_data.json")
    with pytest.raises(RecipeError) as err:
        parse_recipe(data, "r.yaml")
    assert str(err.value).splitlines() == [
        f"r.yaml: sources[0].path: no such file '{tmp_path}/test_imgs.tsv'",
        f"r.yaml: sources[0].path: no such file '{tmp_path}/test_texts.jsonl'",
        f"r.yaml: sources[1].regions: no such file '{tmp_path}/r.json'",
        f"r.yaml: sources[1].image_data: no such file '{tmp_path}/image_data.json'",
    ]


def test_base64_in_either_alphabet_and_bad_payloads():
    import base64

    from cnclip.corpus.sources.cn_clip import decode_image

    data = bytes(range(256)) * 3
    assert decode_image(base64.b64encode(data)) == data
    assert decode_image(base64.urlsafe_b64encode(data)) == data
    assert decode_image(base64.b64encode(data).rstrip(b"=") + b"\r") == data
    assert decode_image(b"") is None and decode_image(b"abc$") is None and decode_image(b"a") is None


def test_the_built_corpus_verifies(built):
    from cnclip.corpus import verify_corpus

    _, recipe = built
    assert verify_corpus(recipe.manifest_dir) == []


def test_changed_annotations_are_read_again_and_clean_keeps_the_users_images(tmp_path):
    from cnclip.corpus import build, clean

    coco = write_coco(tmp_path / "coco", {1: 1, 2: 2}, [(1, "一只红色的猫在睡觉")])
    data = {"name": "c", "output_dir": str(tmp_path / "out"), "manifest_dir": str(tmp_path / "m"),
            "sources": [{"name": "coco", "kind": "coco", "annotations": str(coco),
                         "images": str(tmp_path / "coco" / "images")}],
            "download": {"processes": 1, "threads": 2, "timeout": 3, "retries": 0},
            "image": {"size": 32, "min_side": 16}, "shard": {"processes": 1}, "text": {"processes": 1}}
    build(parse_recipe(data, "c"), show_funnel=False)
    write_coco(tmp_path / "coco", {1: 1, 2: 2}, [(1, "一只红色的猫在睡觉"), (2, "蓝天下的一座白色房子")])
    build(parse_recipe(data, "c"), show_funnel=False)
    samples = pl.read_parquet(tmp_path / "m" / "samples" / "*.parquet")
    assert sorted(samples["image_id"]) == [1, 2]
    originals = {p.name: p.read_bytes() for p in (tmp_path / "coco" / "images").iterdir()}
    clean(parse_recipe(data, "c"))
    assert not (tmp_path / "out" / "work" / "sources").exists()
    assert {p.name: p.read_bytes() for p in (tmp_path / "coco" / "images").iterdir()} == originals
    assert sorted(originals) == ["COCO_val2014_000000000001.jpg", "COCO_val2014_000000000002.jpg"]


def test_visual_genome_images_from_image_data_urls(tmp_path):
    import json

    from cnclip.corpus.sources.visual_genome import read_visual_genome

    regions = tmp_path / "region_descriptions.json"
    regions.write_text(json.dumps([{"id": 1, "regions": [{"phrase": "一棵树"}, {"phrase": " 一棵树 "},
                                                          {"phrase": "蓝天"}, {"phrase": "白云"}]},
                                   {"id": 2, "regions": [{"phrase": "小狗"}]}]), encoding="utf-8")
    image_data = tmp_path / "image_data.json"
    image_data.write_text(json.dumps([{"image_id": 1, "url": "https://cs.example/VG_100K/1.jpg"},
                                      {"image_id": 2}]), encoding="utf-8")
    rows = read_visual_genome(str(regions), "url", str(image_data), tmp_path / "work", " | ", max_phrases=2)
    assert rows.select("url", "caption_raw", "image_id", "detail").rows() == [
        ("https://cs.example/VG_100K/1.jpg", "一棵树 | 蓝天", 1, None),
        (None, "小狗", 2, "region_descriptions.json: [1]: image 2 has no url in image_data.json")]
