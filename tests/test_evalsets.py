"""`cnclip corpus evalset`: published sets written in clip_benchmark's WebDataset layout, one
sample per image with all its captions, read back by `cnclip eval` and by a build's
dedup.eval_images."""

from __future__ import annotations

import json
import tarfile

import polars as pl
import pytest
from typer.testing import CliRunner

from cnclip.cli import app
from dataset_files import jpeg_bytes, tsv_line, write_cn_clip, write_coco
from test_train_support import shape_samples, shape_shards, tiny_config  # noqa: F401

SEEDS = {1: 41, 2: 42, 3: 43}
TEXTS = [{"text_id": 1, "text": "一只红色的猫", "image_ids": [1]},
         {"text_id": 2, "text": "沙发上的 猫\n在睡觉", "image_ids": [1]},
         {"text_id": 3, "text": "两张图共用的描述", "image_ids": [2, 3]},
         "not json",
         {"text_id": 5, "text": "第三张图的描述", "image_ids": [3]},
         {"text_id": 6, "text": "图片不存在", "image_ids": [9]}]


def _members(path):
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalset")
    folder = write_cn_clip(root / "flickr30k-cn", "test", [tsv_line(i, s) for i, s in SEEDS.items()], TEXTS)
    result = CliRunner().invoke(app, ["corpus", "evalset", "flickr30k_cn", str(folder), "--split", "test",
                                      "--out", str(root / "out"), "--samples-per-shard", "2", "--size", "32"])
    assert result.exit_code == 0, result.output
    return root, result.output


def test_one_sample_per_image_with_all_its_captions(written):
    root, output = written
    out = root / "out"
    assert (out / "dataset_type.txt").read_text() == "retrieval\n"
    assert (out / "test" / "nshards.txt").read_text() == "2\n"
    assert json.loads((out / "test" / "sizes.json").read_text()) == {"0.tar": 2, "1.tar": 1}
    first, second = _members(out / "test" / "0.tar"), _members(out / "test" / "1.tar")
    assert list(first) == ["1.jpg", "1.txt", "2.jpg", "2.txt"] and list(second) == ["3.jpg", "3.txt"]
    assert first["1.txt"].decode().splitlines() == ["一只红色的猫", "沙发上的 猫 在睡觉"]
    assert first["2.txt"].decode().splitlines() == ["两张图共用的描述"]
    assert second["3.txt"].decode().splitlines() == ["两张图共用的描述", "第三张图的描述"]
    assert first["1.jpg"] == jpeg_bytes(SEEDS[1]) and second["3.jpg"] == jpeg_bytes(SEEDS[3])
    assert output.splitlines()[-1] == (f"3 images, 5 captions in 2 shard(s) -> {out / 'test'}; 2 input row(s) left "
                                       "out (first: test_texts.jsonl line 4: not valid JSON (Expecting value: line 1 "
                                       "column 1 (char 0)))")
    hashes = pl.read_parquet(out / "test" / "phashes.parquet")
    assert sorted(hashes["id"]) == ["0.tar/1", "0.tar/2", "1.tar/3"]


def test_a_written_split_is_not_overwritten_and_coco_needs_local_images(written, tmp_path):
    root, _ = written
    folder = root / "flickr30k-cn"
    before = _members(root / "out" / "test" / "0.tar")
    result = CliRunner().invoke(app, ["corpus", "evalset", "flickr30k_cn", str(folder), "--out", str(root / "out")])
    assert result.exit_code == 2
    assert f"{root / 'out' / 'test'}: already exists; remove it or choose another --out" in result.output
    assert _members(root / "out" / "test" / "0.tar") == before
    coco = write_coco(tmp_path / "coco", {1: 1}, [(1, "一只猫")])
    result = CliRunner().invoke(app, ["corpus", "evalset", "coco", str(coco), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "coco: --images must name the folder holding the images" in result.output
    assert not (tmp_path / "o").exists()


def test_coco_captions_are_grouped_per_image(tmp_path):
    coco = write_coco(tmp_path / "coco", {5: 1, 6: 2}, [(5, "第一句描述"), (6, "另一张图"), (5, "第二句描述"),
                                                        (5, "第一句描述")])
    result = CliRunner().invoke(app, ["corpus", "evalset", "coco", str(coco), "--images", str(tmp_path / "coco" / "images"),
                                      "--split", "val", "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    members = _members(tmp_path / "out" / "val" / "0.tar")
    assert list(members) == ["5.jpg", "5.txt", "6.jpg", "6.txt"]
    assert members["5.txt"].decode().splitlines() == ["第一句描述", "第二句描述"]
    assert members["6.jpg"] == jpeg_bytes(2)


def test_cnclip_eval_reads_the_shards_as_a_retrieval_set(written, tmp_path, shape_shards):  # noqa: F811
    from cnclip.train.loop import train

    root, _ = written
    train(tiny_config(tmp_path, shape_shards, stage1={"steps": 1}, stage2={"steps": 1}))
    checkpoint = tmp_path / "run" / "checkpoints" / "stage2-final.pt"
    result = CliRunner().invoke(app, ["eval", str(checkpoint), "--data", str(root / "out" / "test" / "*.tar"),
                                      "--device", "cpu"])
    assert result.exit_code == 0, result.output
    record = json.loads(result.output.strip().splitlines()[-1])
    assert (record["images"], record["texts"]) == (3, 5)
    # With 3 images, any image's captions are within its top 5: every query hits at 5.
    assert record["text_to_image_R@5"] == record["image_to_text_R@5"] == 100.0


def test_the_phash_list_drops_an_eval_image_from_a_build(written, tmp_path):
    from cnclip.corpus import build, parse_recipe

    root, _ = written
    train_set = write_cn_clip(tmp_path / "train", "train", [tsv_line(1, SEEDS[1]), tsv_line(7, 77)],
                              [{"text_id": 1, "text": "训练集里的一张图", "image_ids": [1, 7]},
                               {"text_id": 2, "text": "同一张图的第二句描述", "image_ids": [1]}])
    data = {"name": "decontaminated", "output_dir": str(tmp_path / "o"), "manifest_dir": str(tmp_path / "m"),
            "sources": [{"name": "train", "kind": "cn_clip", "path": str(train_set)}],
            "download": {"processes": 1, "threads": 2, "timeout": 3, "retries": 0},
            "image": {"size": 32, "min_side": 16}, "shard": {"processes": 1}, "text": {"processes": 1},
            "dedup": {"eval_images": [str(root / "out" / "test" / "phashes.parquet")]}}
    build(parse_recipe(data, "r"), show_funnel=False)
    samples = pl.read_parquet(tmp_path / "m" / "samples" / "*.parquet")
    rejected = pl.read_parquet(tmp_path / "m" / "rejected" / "*.parquet")
    assert samples["image_id"].to_list() == [7]
    overlap = rejected.filter(pl.col("reason") == "dedup:eval_overlap")
    # Both captions of the eval image go, as one image.
    assert overlap["image_id"].to_list() == [1, 1]
    assert overlap["duplicate_of"].to_list() == [f"{root / 'out' / 'test' / 'phashes.parquet'}:0.tar/1"] * 2


def test_evalset_help_shows_an_example():
    result = CliRunner().invoke(app, ["corpus", "evalset", "--help"])
    assert result.exit_code == 0 and "Example: cnclip corpus evalset flickr30k_cn" in result.output


def test_read_as_clip_benchmark_reads_a_wds_set(written):
    """clip_benchmark's build_wds_dataset, step for step: nshards.txt, dataset_type.txt, the
    brace pattern of the tars, images decoded with PIL and `{key}.txt` split into lines."""
    import webdataset as wds

    root, _ = written
    data_dir = root / "out"
    nshards = int((data_dir / "test" / "nshards.txt").read_text())
    assert (data_dir / "dataset_type.txt").read_text().strip().lower() == "retrieval"
    pattern = str(data_dir / "test" / ("{0..%d}.tar" % (nshards - 1)))
    dataset = (wds.WebDataset(pattern, nodesplitter=lambda src: src, shardshuffle=False)
               .decode(wds.autodecode.ImageHandler("pil", extensions=["webp", "png", "jpg", "jpeg"]))
               .to_tuple("webp;png;jpg;jpeg", "txt").map_tuple(lambda image: image.size, str.splitlines))
    assert list(dataset) == [((64, 64), ["一只红色的猫", "沙发上的 猫 在睡觉"]), ((64, 64), ["两张图共用的描述"]),
                             ((64, 64), ["两张图共用的描述", "第三张图的描述"])]


def test_members_are_named_by_what_the_image_is():
    import io

    from PIL import Image

    from cnclip.evalsets import _image_member

    def encoded(fmt):
        buffer = io.BytesIO()
        Image.new("RGB", (8, 8), (200, 10, 10)).save(buffer, format=fmt)
        return buffer.getvalue()

    png, gif = encoded("PNG"), encoded("GIF")
    assert _image_member(png) == ("png", png)
    assert _image_member(encoded("JPEG"))[0] == "jpg"
    extension, data = _image_member(gif)
    assert extension == "png" and Image.open(io.BytesIO(data)).format == "PNG"
    assert _image_member(b"not an image") is None and _image_member(png[:40]) is None
