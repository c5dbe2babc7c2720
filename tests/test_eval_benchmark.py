"""`cnclip eval` on clip_benchmark-layout folders made here, with the model trained on the demo
corpus (tests/search_corpus.py): zero-shot colour classification with the Chinese templates, and a
retrieval folder scored as its shards are when named one by one."""

from __future__ import annotations

import io
import json
import random
import shutil

import pytest
import webdataset as wds
from typer.testing import CliRunner

from cnclip.corpus.sources.sample_web import COLORS, SHAPES, draw_shape
from cnclip.train.cli import app

# The first test builds the demo corpus and trains on it, unless another test did (minutes on 2 cores).
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

PER_COLOUR = 20
# Prompts in clip_benchmark's `{c}` style, worded like the corpus's captions.
FOLDER_TEMPLATES = ["一个{c}的图形", "画着{c}图形的图片", "浅色背景上的{c}形状"]


@pytest.fixture(scope="module")
def checkpoint(searchable_corpus):
    return searchable_corpus.parent / "run" / "checkpoints" / "stage2-final.pt"


def _pictures(seed: int) -> list[tuple[bytes, int, str]]:
    """(jpg, colour index, caption) for PER_COLOUR shapes of each of the demo's six colours, drawn
    as the sample web draws them but from another seed (pictures the model never saw)."""
    rng = random.Random(seed)
    out = []
    for index in range(PER_COLOUR * len(COLORS)):
        colour = index % len(COLORS)
        shape = SHAPES[rng.randrange(len(SHAPES))][0]
        buffer = io.BytesIO()
        draw_shape(COLORS[colour][2], shape, rng).save(buffer, format="JPEG", quality=90)
        out.append((buffer.getvalue(), colour, f"一个{COLORS[colour][0]}的{shape}"))
    return out


def _write_folder(root, pictures, *, retrieval: bool, nshards: int = 2):
    """clip_benchmark's layout: test/nshards.txt, test/{0..n-1}.tar (and dataset_type.txt for retrieval)."""
    (root / "test").mkdir(parents=True)
    per_shard = -(-len(pictures) // nshards)
    for shard in range(nshards):
        with wds.TarWriter(str(root / "test" / f"{shard}.tar")) as writer:
            for i, (jpg, colour, caption) in enumerate(pictures[shard * per_shard:(shard + 1) * per_shard]):
                member = {"txt": caption} if retrieval else {"cls": str(colour)}
                writer.write({"__key__": f"{shard}_{i:04d}", "jpg": jpg, **member})
    (root / "test" / "nshards.txt").write_text(f"{nshards}\n", encoding="utf-8")
    if retrieval:
        (root / "dataset_type.txt").write_text("retrieval\n", encoding="utf-8")
    else:
        (root / "classnames.txt").write_text("".join(f"{c[0]}\n" for c in COLORS), encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def colour_folder(tmp_path_factory):
    """A classification folder without a template file: cnclip's default Chinese prompts apply."""
    return _write_folder(tmp_path_factory.mktemp("colours") / "set", _pictures(seed=101), retrieval=False)


def run_eval(*args: str) -> dict:
    result = CliRunner().invoke(app, ["eval", *map(str, args), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    return json.loads(result.output.strip().splitlines()[-1])


def test_zero_shot_colours_with_the_default_chinese_templates(checkpoint, colour_folder):
    record = run_eval(checkpoint, "--data", colour_folder)
    assert (record["kind"], record["images"]) == ("zeroshot", PER_COLOUR * len(COLORS))
    # Measured: top-1 67.5 (64.2 and 65.0 on pictures of two other seeds), top-5 100; chance 16.7.
    # The run's vocabulary is the demo captions' ~50 characters: most of the photo prompts' words are [UNK].
    assert record["top1"] > 40, record
    assert 100 >= record["top5"] >= record["top1"]


def test_zero_shot_colours_with_the_folders_own_templates(checkpoint, colour_folder, tmp_path):
    folder = tmp_path / "with-templates"
    shutil.copytree(colour_folder, folder)
    (folder / "zeroshot_classification_templates.txt").write_text("\n".join(FOLDER_TEMPLATES) + "\n",
                                                                  encoding="utf-8")
    record = run_eval(checkpoint, "--data", folder)
    # Measured: top-1 95.8 (90.8 and 91.7 on pictures of two other seeds), top-5 100; chance 16.7.
    assert record["top1"] > 70, record
    assert 100 >= record["top5"] >= record["top1"]
    # The folder's file is the one read: a prompt in it without a place for the name is refused.
    templates = folder / "zeroshot_classification_templates.txt"
    templates.write_text("一个{c}的图形\n一个图形\n", encoding="utf-8")
    bad = CliRunner().invoke(app, ["eval", str(checkpoint), "--data", str(folder), "--device", "cpu"])
    assert bad.exit_code == 2
    assert bad.output.strip().splitlines()[-1].endswith(
        f"{templates}: template 2 ('一个图形') has no {{}} or {{c}} for the class name")


def test_a_retrieval_folder_scores_as_its_shards_do(checkpoint, tmp_path):
    folder = _write_folder(tmp_path / "ret", _pictures(seed=102), retrieval=True)
    by_folder = run_eval(checkpoint, "--data", folder)
    by_shards = run_eval(checkpoint, "--data", f"{folder}/test/{{0..1}}.tar")
    assert by_folder["kind"] == by_shards["kind"] == "retrieval"
    metrics = {k: v for k, v in by_folder.items() if k != "data"}
    assert metrics == {k: v for k, v in by_shards.items() if k != "data"}
    assert metrics["images"] == metrics["texts"] == PER_COLOUR * len(COLORS)
    assert metrics["mean_recall"] > 0
