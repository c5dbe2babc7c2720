"""The translate stage end to end through a build: an English metadata source translated by a
`command` backend (a dictionary script), the translations through the Chinese-ratio filter into
samples/ with the English kept in caption_en, an untranslatable caption rejected with its reason,
and builds that find every caption in the cache translating nothing again."""

import json
import random
import sys
import tarfile
from pathlib import Path

import polars as pl
import pytest

from cnclip.corpus import build, run_text
from cnclip.corpus.manifests.schemas import REJECTED, SAMPLES, TRANSLATE_CACHE, TRANSLATE_TODO, TRANSLATED
from cnclip.corpus.sources.sample_web import draw_shape
from translate_dictionary import DICTIONARY

pytestmark = pytest.mark.slow

SCRIPT = str(Path(__file__).with_name("translate_dictionary.py"))
ENGLISH = ["a red square", "a green circle", "a blue triangle", "a red square", "a purple hexagon"]


def calls(counter: Path) -> list[int]:
    """The number of captions each run of the script was sent."""
    return [int(line) for line in counter.read_text().split()] if counter.exists() else []


@pytest.fixture
def sources(tmp_path, web_root, web):
    """An English source (the first and fourth caption the same, the last one not in the
    dictionary) and a Chinese one, whose English caption is not translated."""
    (web_root / "img").mkdir()
    for i in range(7):
        draw_shape((40 * i, 200 - 20 * i, 90), "方形", random.Random(i)).save(web_root / f"img/{i}.png")
    english = [{"url": f"{web.base_url}/img/{i}.png", "caption": text} for i, text in enumerate(ENGLISH)]
    chinese = [{"url": f"{web.base_url}/img/5.png", "caption": "一只灰色的小猫咪"},
               {"url": f"{web.base_url}/img/6.png", "caption": "a yellow square"}]
    (tmp_path / "coco.jsonl").write_text("".join(json.dumps(row) + "\n" for row in english))
    pl.DataFrame(chinese).write_parquet(tmp_path / "zh.parquet")
    return [{"name": "coco_en", "kind": "metadata", "path": str(tmp_path / "coco.jsonl")},
            {"name": "zh", "kind": "metadata", "path": str(tmp_path / "zh.parquet")}]


def translate(tmp_path, **settings):
    return {"sources": ["coco_en"], "backend": "command", "batch_size": 2, "cache": str(tmp_path / "cache"),
            "command": [sys.executable, SCRIPT, str(tmp_path / "calls.txt")], **settings}


def test_english_captions_reach_the_samples_in_chinese(tmp_path, sources, make_recipe):
    recipe = make_recipe(sources, translate=translate(tmp_path))
    funnel = build(recipe, show_funnel=False)
    # 4 unique readable captions, in batches of 2; the repeated one sent once.
    assert calls(tmp_path / "calls.txt") == [2, 2]
    samples = pl.read_parquet(tmp_path / "manifests" / "samples" / "*.parquet").sort("uid")
    assert samples.select("source", "caption", "caption_raw", "caption_en").rows() == [
        ("coco_en", "一个红色的方形图案", "一个红色的方形图案", "a red square"),
        ("coco_en", "一个绿色的圆形图案", "一个绿色的圆形图案", "a green circle"),
        ("coco_en", "一个蓝色的三角形图案", "一个蓝色的三角形图案", "a blue triangle"),
        ("coco_en", "一个红色的方形图案", "一个红色的方形图案", "a red square"),
        ("zh", "一只灰色的小猫咪", "一只灰色的小猫咪", None),
    ]
    assert samples.columns.index("caption_en") == samples.columns.index("phash") + 1
    rejected = pl.concat([pl.read_parquet(p) for p in sorted((tmp_path / "manifests" / "rejected").glob("*.parquet"))])
    rows = rejected.sort("uid").select("source", "stage", "reason", "caption_raw", "caption_en").rows()
    assert rows == [("coco_en", "translate", "translate:failed", "a purple hexagon", "a purple hexagon"),
                    ("zh", "text", "text:not_chinese", "a yellow square", None)]
    assert rejected.filter(pl.col("stage") == "translate")["detail"].to_list() == [
        "the command backend gave no translation of caption_en"]
    stages = {row["stage"]: row for row in funnel["stages"]}
    assert list(stages)[:3] == ["ingest", "translate", "text"]
    assert stages["translate"]["rejected"] == {"translate:failed": 1} and stages["translate"]["out"] == 6
    with tarfile.open(tmp_path / "out" / "shards" / "00000.tar") as tar:
        key = samples["key"][1]
        assert tar.extractfile(f"{key}.txt").read().decode() == "一个绿色的圆形图案"
        assert json.loads(tar.extractfile(f"{key}.json").read())["caption_en"] == "a green circle"

    # Every file of the stage (and the cache, outside the build) is its declared table's.
    translated = sorted((tmp_path / "out" / "work" / "translate" / "parts").glob("*.parquet"))
    assert [p.name for p in translated] == ["000-00000.parquet"]
    for path in translated:
        TRANSLATED.check_file(path)
    TRANSLATE_TODO.check_file(tmp_path / "out" / "work" / "translate" / "todo.parquet")
    cache = pl.read_parquet(tmp_path / "cache" / "*.parquet")
    for path in (tmp_path / "cache").glob("*.parquet"):
        TRANSLATE_CACHE.check_file(path)
    assert sorted(cache.select("text", "translation").rows(), key=str) == sorted(
        [(text, DICTIONARY.get(text)) for text in set(ENGLISH)], key=str)
    for folder in ("samples", "rejected"):
        for path in (tmp_path / "manifests" / folder).glob("*.parquet"):
            (SAMPLES if folder == "samples" else REJECTED).check_file(path)

    # The stage redone (another batch size), and another build sharing the cache: nothing is sent.
    summary = run_text(make_recipe(sources, translate=translate(tmp_path, batch_size=3)))
    assert summary["accepted"] == 5 and calls(tmp_path / "calls.txt") == [2, 2]
    other = make_recipe(sources, translate=translate(tmp_path), output_dir=str(tmp_path / "out2"),
                        manifest_dir=str(tmp_path / "manifests2"))
    assert build(other, show_funnel=False)["samples"] == 5
    assert calls(tmp_path / "calls.txt") == [2, 2]
    assert pl.read_parquet(tmp_path / "manifests2" / "samples" / "*.parquet").sort("uid").drop("key", "shard").equals(
        samples.drop("key", "shard"))
