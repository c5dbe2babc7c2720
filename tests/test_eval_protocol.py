"""The evaluation protocol: squash (Chinese-CLIP's eval transform) against center_crop (open_clip's)."""

from __future__ import annotations

import io

import pytest
import torch
import webdataset as wds
from PIL import Image

from cnclip.train.config import EvalSet, parse_config
from cnclip.train.evaluate import evaluate_set
from cnclip.train.factory import eval_transform
from cnclip.train.models import create_model
from test_train_support import shape_shards  # noqa: F401 (session fixture)

SIDE = 64  # cn-tiny's image size


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    model, _ = create_model("cn-tiny", vocab_size=21128, workdir=tmp_path_factory.mktemp("tiny"))
    return model


def noisy_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """A non-square picture with detail everywhere, so any difference in cropping or filtering shows."""
    gen = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (height, width, 3), generator=gen, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy(), "RGB")


def test_squash_is_chinese_clips_eval_transform(tiny_model):
    from cn_clip.clip.utils import image_transform

    image = noisy_image(150, 90)
    ours = eval_transform(tiny_model, "squash")(image)
    assert ours.shape == (3, SIDE, SIDE)
    assert torch.equal(ours, image_transform(SIDE)(image))


def test_center_crop_is_open_clips_eval_transform(tiny_model):
    import open_clip

    image = noisy_image(150, 90)
    ours = eval_transform(tiny_model, "center_crop")(image)
    assert torch.equal(ours, open_clip.image_transform(SIDE, is_train=False)(image))
    assert torch.equal(eval_transform(tiny_model)(image), ours)  # the default
    assert not torch.allclose(ours, eval_transform(tiny_model, "squash")(image))


def test_a_square_image_is_the_same_under_both(tiny_model):
    image = noisy_image(SIDE * 2, SIDE * 2, seed=3)
    assert torch.allclose(eval_transform(tiny_model, "squash")(image), eval_transform(tiny_model, "center_crop")(image))


# --- a retrieval set whose pictures differ only at their left and right edges ----------------------

EDGE_COLOURS = {"红": (230, 20, 20), "绿": (20, 200, 40), "蓝": (30, 40, 230), "黄": (235, 220, 30),
                "青": (20, 210, 210), "紫": (200, 30, 200)}
GREY = 128
MEAN = torch.tensor((0.48145466, 0.4578275, 0.40821073))
STD = torch.tensor((0.26862954, 0.26130258, 0.27577711))


def edge_picture(colour: tuple[int, int, int]) -> bytes:
    """300×100: a grey middle third (what a center crop keeps) between two coloured edge bands."""
    image = Image.new("RGB", (300, 100), colour)
    image.paste((GREY, GREY, GREY), (80, 0, 220, 100))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


class ColourReader(torch.nn.Module):
    """A stand-in CLIP that sees only colour: an image's embedding is its mean normalized pixel
    minus that of plain grey; a caption's is its colour's direction in the same space. What it can
    tell apart is exactly what the transform leaves in the picture."""

    def __init__(self):
        super().__init__()
        self.grey = (GREY / 255 - MEAN) / STD

    def encode_image(self, images, normalize=True):
        feats = images.mean(dim=(2, 3)) - self.grey
        return torch.nn.functional.normalize(feats, dim=1) if normalize else feats

    def encode_text(self, directions, normalize=True):
        return torch.nn.functional.normalize(directions, dim=1)


def colour_tokenizer(texts):
    return torch.stack([(torch.tensor(EDGE_COLOURS[t[0]], dtype=torch.float) - GREY) / 255 / STD for t in texts])


@pytest.fixture(scope="module")
def edge_set(tmp_path_factory):
    path = tmp_path_factory.mktemp("edges") / "0.tar"
    with wds.TarWriter(str(path)) as writer:
        for i, name in enumerate(EDGE_COLOURS):
            writer.write({"__key__": f"e{i}", "png": edge_picture(EDGE_COLOURS[name]),
                          "txt": f"{name}色边框的灰色图片".encode()})
    return str(path)


def test_retrieval_on_edge_content_depends_on_the_resize(edge_set, tiny_model):
    eval_set = EvalSet(name="edges", data=edge_set)
    metrics = {resize: evaluate_set(ColourReader(), colour_tokenizer, eval_set, eval_transform(tiny_model, resize),
                                    device=torch.device("cpu"))
               for resize in ("squash", "center_crop")}
    # Squashed, every picture keeps its coloured edges: each caption finds its own image first.
    assert metrics["squash"]["text_to_image_R@1"] == metrics["squash"]["image_to_text_R@1"] == 100.0
    # Center-cropped, all six are the same grey square: at most one of six ties resolves right.
    assert metrics["center_crop"]["text_to_image_R@1"] <= 100 / 6 + 1e-6
    assert metrics["center_crop"]["mean_recall"] < metrics["squash"]["mean_recall"]


def test_resize_in_a_training_config(tmp_path):
    base = {"output_dir": str(tmp_path), "model": "cn-tiny", "data": {"train": "x.tar"}, "batch_size": 2,
            "stage1": {"steps": 1, "lr": 1e-3}, "stage2": {"steps": 1, "lr": 1e-3}}
    cfg = parse_config({**base, "eval": {"resize": "squash", "sets": [
        {"name": "a", "data": "a.tar"}, {"name": "b", "data": "b.tar", "resize": "center_crop"}]}}, "cfg.yaml")
    assert [cfg.eval.resize_for(s) for s in cfg.eval.sets] == ["squash", "center_crop"]
    default = parse_config({**base, "eval": {"sets": [{"name": "a", "data": "a.tar"}]}}, "cfg.yaml")
    assert default.eval.resize_for(default.eval.sets[0]) == "center_crop"
    from cnclip.train.config import ConfigError

    with pytest.raises(ConfigError, match=r"^cfg.yaml: eval.sets\[0\].resize: Input should be 'squash' or "
                                          r"'center_crop'"):
        parse_config({**base, "eval": {"sets": [{"name": "a", "data": "a.tar", "resize": "crop"}]}}, "cfg.yaml")


def test_cli_refuses_an_unknown_resize(tmp_path):
    from typer.testing import CliRunner

    from cnclip.train.cli import app

    result = CliRunner().invoke(app, ["eval", str(tmp_path / "x.pt"), "--data", "x.tar", "--resize", "crop"])
    assert result.exit_code == 2
    assert result.output.strip().splitlines()[-1].endswith("--resize: center_crop or squash (got 'crop')")


# --- clip_benchmark's WebDataset layout, read directly -------------------------------------------

def benchmark_folder(root, *, kind=None, nshards=2, per_shard=3, split="test", classnames=None, templates=None):
    """A folder in clip_benchmark's layout: {split}/nshards.txt and {split}/0.tar ..., coloured shapes."""
    from test_train_support import shape_samples

    split_dir = root / split
    split_dir.mkdir(parents=True)
    if kind is not None:
        (root / "dataset_type.txt").write_text(kind + "\n", encoding="utf-8")
    samples = shape_samples(nshards * per_shard, seed=5)
    for shard in range(nshards):
        with wds.TarWriter(str(split_dir / f"{shard}.tar")) as writer:
            for i, sample in enumerate(samples[shard * per_shard:(shard + 1) * per_shard]):
                writer.write({"__key__": f"s{shard}_{i}", "jpg": sample["jpg"], "txt": sample["txt"],
                              "cls": str(sample["cls"] // 4)})
    (split_dir / "nshards.txt").write_text(f"{nshards}\n", encoding="utf-8")
    if classnames is not None:
        (root / "classnames.txt").write_text("\n".join(classnames) + "\n", encoding="utf-8")
    if templates is not None:
        (root / "zeroshot_classification_templates.txt").write_text("\n".join(templates) + "\n", encoding="utf-8")
    return root


def test_a_retrieval_folder_expands_to_its_shards(tmp_path):
    from cnclip.train.clip_benchmark import resolve_eval_set

    folder = benchmark_folder(tmp_path / "flickr", kind="retrieval", nshards=3)
    resolved = resolve_eval_set(EvalSet(name="f", data=str(folder)))
    assert resolved.kind == "retrieval"
    assert resolved.patterns == [str(folder / "test" / f"{i}.tar") for i in range(3)]
    assert resolve_eval_set(resolved) == resolved  # already resolved: unchanged
    # Plain shard patterns are left alone (a kind of none is retrieval).
    plain = resolve_eval_set(EvalSet(name="p", data=str(folder / "test" / "*.tar")))
    assert (plain.kind, plain.patterns) == ("retrieval", [str(folder / "test" / "*.tar")])


def test_a_classification_folder_brings_its_class_names_and_templates(tmp_path):
    from cnclip.train.clip_benchmark import resolve_eval_set

    folder = benchmark_folder(tmp_path / "colours", nshards=1, classnames=["红色", "绿色"], templates=["一张{c}的照片"])
    resolved = resolve_eval_set(EvalSet(name="c", data=str(folder)))  # no dataset_type.txt: classification
    assert (resolved.kind, resolved.classnames, resolved.templates) == (
        "zeroshot", folder / "classnames.txt", folder / "zeroshot_classification_templates.txt")
    mine = tmp_path / "mine.txt"
    mine.write_text("红\n绿\n", encoding="utf-8")
    given = resolve_eval_set(EvalSet(name="c", data=str(folder), classnames=mine, templates=mine))
    assert (given.classnames, given.templates) == (mine, mine)  # what the user names wins
    typed = benchmark_folder(tmp_path / "typed", kind="classification", classnames=["红色"])
    assert resolve_eval_set(EvalSet(name="t", data=str(typed))).templates is None  # the built-in prompts
    # A retrieval folder evaluated as classification when the user gives class names.
    both = benchmark_folder(tmp_path / "both", kind="retrieval")
    assert resolve_eval_set(EvalSet(name="b", data=str(both), classnames=mine)).kind == "zeroshot"


def test_templates_with_c_are_read_as_str_format_ones(tmp_path):
    from cnclip.train.data import DataError
    from cnclip.train.evaluate import _fillers, read_templates

    path = tmp_path / "t.txt"
    path.write_text("一张{c}的照片\n\n{}的{画}\n", encoding="utf-8")
    templates = read_templates(path)
    assert templates == ["一张{}的照片", "{}的{画}"]
    assert [fill("红色") for fill in _fillers(templates)] == ["一张红色的照片", "红色的{画}"]  # other braces kept
    path.write_text("一张{c}的照片\n一张照片\n", encoding="utf-8")
    with pytest.raises(DataError, match=rf"^{path}: template 2 \('一张照片'\) has no {{}} or {{c}} for the class name$"):
        read_templates(path)


@pytest.mark.parametrize("make, message", [
    (lambda root: (root / "test").mkdir(parents=True),
     r"^--data: {root} is no clip_benchmark WebDataset folder for split 'test' \(no test/nshards.txt; give shard "
     r"patterns, or a folder in that layout\)$"),
    (lambda root: benchmark_folder(root, split="val"),
     r"^--data: {root} is no clip_benchmark WebDataset folder for split 'test' \(no test/nshards.txt; its splits: "
     r"val\)$"),
    (lambda root: (root.mkdir(), (root / "00000.tar").write_bytes(b"")),
     r"^--data: {root} is no clip_benchmark WebDataset folder for split 'test' \(no test/nshards.txt; for the tars "
     r"in it give '{root}/\*.tar'\)$"),
    (lambda root: (benchmark_folder(root, kind="retrieval"), (root / "test" / "nshards.txt").write_text("two")),
     r"^--data: {root}/test/nshards.txt: expected the number of shards \(a positive integer\), got 'two'$"),
    (lambda root: (benchmark_folder(root, kind="retrieval"), (root / "test" / "nshards.txt").write_text("0")),
     r"^--data: {root}/test/nshards.txt: expected the number of shards \(a positive integer\), got '0'$"),
    (lambda root: benchmark_folder(root),
     r"^--data: {root} is a classification set without classnames.txt \(one class name per line; or name a file "
     r"with classnames / --classnames\)$"),
    (lambda root: (benchmark_folder(root, kind="retrieval"), (root / "test" / "nshards.txt").write_text("9" * 30)),
     r"^--data: {root}/test/nshards.txt says 9{{30}} shards, but there is no {root}/test/9{{29}}8.tar$"),
], ids=["no-nshards", "other-split", "plain-tars", "nshards-not-a-number", "no-shards", "no-classnames",
        "nshards-too-many"])
def test_a_wrong_folder_is_a_one_line_error(tmp_path, make, message):
    import re

    from cnclip.train.clip_benchmark import resolve_eval_set
    from cnclip.train.data import DataError

    root = tmp_path / "set"
    make(root)
    with pytest.raises(DataError, match=message.format(root=re.escape(str(root)))):
        resolve_eval_set(EvalSet(name="cli", data=str(root)), "--data")


def test_a_missing_shard_of_a_folder_is_named(tmp_path):
    from cnclip.train.data import DataError

    folder = benchmark_folder(tmp_path / "set", kind="retrieval", nshards=3)
    (folder / "test" / "1.tar").unlink()
    eval_set = EvalSet(name="f", data=str(folder))
    with pytest.raises(DataError, match=rf"^eval.sets\[f\]: no such shard: {folder}/test/1.tar$"):
        evaluate_set(ColourReader(), colour_tokenizer, eval_set, lambda image: image, device=torch.device("cpu"))


def test_a_training_config_reads_folders_before_training(tmp_path):
    from cnclip.train.clip_benchmark import resolve_eval_sets
    from cnclip.train.config import ConfigError

    retrieval = benchmark_folder(tmp_path / "r", kind="retrieval")
    colours = benchmark_folder(tmp_path / "c", classnames=["红色", "绿色", "蓝色", "黄色", "紫色", "橙色"])
    base = {"output_dir": str(tmp_path / "run"), "model": "cn-tiny", "data": {"train": "x.tar"}, "batch_size": 2,
            "stage1": {"steps": 1, "lr": 1e-3}, "stage2": {"steps": 1, "lr": 1e-3}}
    cfg = parse_config({**base, "eval": {"sets": [{"name": "r", "data": str(retrieval)},
                                                  {"name": "c", "data": str(colours), "resize": "squash"}]}}, "t.yaml")
    sets = resolve_eval_sets(cfg)
    assert [(s.kind, len(s.patterns)) for s in sets] == [("retrieval", 2), ("zeroshot", 2)]
    assert cfg.eval.resize_for(sets[1]) == "squash"
    # stage1.patience needs a retrieval set: a classification folder is none, found once it is read.
    patient = parse_config({**base, "stage1": {"steps": 1, "lr": 1e-3, "patience": 2},
                            "eval": {"every": 1, "sets": [{"name": "c", "data": str(colours)}]}}, "t.yaml")
    with pytest.raises(ConfigError, match=r"^stage1.patience needs a retrieval set in eval.sets \(the folders given "
                                          r"hold classification sets\)$"):
        resolve_eval_sets(patient)
    # A zeroshot set of shard patterns still needs its class names at parse time.
    with pytest.raises(ConfigError, match=r"a zeroshot set needs classnames"):
        parse_config({**base, "eval": {"sets": [{"name": "z", "kind": "zeroshot", "data": "x.tar"}]}}, "t.yaml")


def test_a_label_beyond_the_class_names_is_an_error():
    from cnclip.train.data import DataError
    from cnclip.train.evaluate import zeroshot_metrics

    feats = torch.nn.functional.normalize(torch.randn(3, 4), dim=1)
    with pytest.raises(DataError, match=r"^zero-shot set: a \{key\}.cls label \(6\) is no index into the 6 class "
                                        r"names$"):
        zeroshot_metrics(None, None, feats, [0, 6, None], ["红", "绿", "蓝", "黄", "紫", "橙"], ["{}"], torch.device("cpu"))
    with pytest.raises(DataError, match=r"label \(-1\) is no index into the 2 class names$"):
        zeroshot_metrics(None, None, feats, [0, -1, 1], ["红", "绿"], ["{}"], torch.device("cpu"))


BLANK = r"line {n} is blank \(one class name per line, line n for \{{key\}}.cls label n-1; blank lines only at the end\)$"


def test_class_names_are_one_a_line_and_a_blank_line_before_the_last_is_an_error(tmp_path):
    import re

    from cnclip.train.clip_benchmark import read_class_names
    from cnclip.train.data import DataError

    path = tmp_path / "classnames.txt"
    for text in ("红色\n绿色\n", "红色\n绿色", "红色\n绿色\n\n  \n", " 红色 \r\n绿色\r\n\r\n"):
        path.write_text(text, encoding="utf-8")
        assert read_class_names(path) == ["红色", "绿色"], repr(text)  # trailing blank lines are the file's end
    for text, line in (("红色\n\n绿色\n", 2), ("红色\n绿色\n \t\n蓝色\n\n", 3), ("\n红色\n", 1)):
        path.write_text(text, encoding="utf-8")
        with pytest.raises(DataError, match=f"^{re.escape(str(path))}: " + BLANK.format(n=line)):
            read_class_names(path)
    path.write_text("\n\n", encoding="utf-8")
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}: no class names \(one per line"):
        read_class_names(path)


@pytest.fixture(scope="module")
def labelled_edges(tmp_path_factory):
    """The edge pictures as a classification set: picture i is labelled i, the i-th colour."""
    path = tmp_path_factory.mktemp("labelled") / "0.tar"
    with wds.TarWriter(str(path)) as writer:
        for i, name in enumerate(EDGE_COLOURS):
            writer.write({"__key__": f"e{i}", "png": edge_picture(EDGE_COLOURS[name]), "cls": str(i)})
    return str(path)


def test_zero_shot_labels_index_the_class_name_lines(tmp_path, labelled_edges, tiny_model):
    import re

    from cnclip.train.data import DataError

    names, templates = tmp_path / "classnames.txt", tmp_path / "templates.txt"
    templates.write_text("{c}色边框\n", encoding="utf-8")
    names.write_text("\n".join(EDGE_COLOURS) + "\n\n\n", encoding="utf-8")  # trailing blank lines: fine
    eval_set = EvalSet(name="e", kind="zeroshot", data=labelled_edges, classnames=names, templates=templates)
    squash = eval_transform(tiny_model, "squash")
    metrics = evaluate_set(ColourReader(), colour_tokenizer, eval_set, squash, device=torch.device("cpu"))
    assert (metrics["top1"], metrics["images"]) == (100.0, 6)  # each picture is its own line's colour
    # A blank second line: dropped, label 1 (绿) would be scored against 蓝 and so on; refused at once.
    names.write_text("红\n\n" + "\n".join(list(EDGE_COLOURS)[1:]) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=rf"^eval.sets\[e\]: {re.escape(str(names))}: " + BLANK.format(n=2)):
        evaluate_set(ColourReader(), colour_tokenizer, eval_set, squash, device=torch.device("cpu"))


def test_a_training_config_reads_class_name_files_before_training(tmp_path):
    import re

    from cnclip.train.clip_benchmark import resolve_eval_sets
    from cnclip.train.data import DataError

    colours = benchmark_folder(tmp_path / "c", classnames=["红色", "", "蓝色"])
    cfg = parse_config({"output_dir": str(tmp_path / "run"), "model": "cn-tiny", "data": {"train": "x.tar"},
                        "batch_size": 2, "stage1": {"steps": 1, "lr": 1e-3}, "stage2": {"steps": 1, "lr": 1e-3},
                        "eval": {"sets": [{"name": "c", "data": str(colours)}]}}, "t.yaml")
    with pytest.raises(DataError, match=rf"^eval.sets\[c\]: {re.escape(str(colours / 'classnames.txt'))}: "
                                        + BLANK.format(n=2)):
        resolve_eval_sets(cfg)


def test_the_default_templates_are_chinese_clips_imagenet_prompts():
    from cn_clip.eval.imagenet_zeroshot_templates import openai_imagenet_template

    from cnclip.train.evaluate import CHINESE_TEMPLATES

    assert CHINESE_TEMPLATES == [prompt("{}") for prompt in openai_imagenet_template]
    assert len(CHINESE_TEMPLATES) == 80


def test_a_training_run_evaluates_clip_benchmark_folders(tmp_path, shape_shards):
    from cnclip.train.loop import train
    from cnclip.train.runlog import read_log
    from test_train_support import tiny_config

    retrieval = benchmark_folder(tmp_path / "r", kind="retrieval")
    colours = benchmark_folder(tmp_path / "c", classnames=["红色", "绿色", "蓝色", "黄色", "紫色", "橙色"],
                               templates=["一个{c}的图形"])
    cfg = tiny_config(tmp_path, shape_shards, stage1={"steps": 2}, stage2={"steps": 2},
                      eval={"resize": "squash", "sets": [{"name": "r", "data": str(retrieval)},
                                                        {"name": "c", "data": str(colours)}]})
    summary = train(cfg)
    last = summary["stages"][2]["evals"][-1]["sets"]
    assert (last["r"]["images"], last["r"]["texts"]) == (6, 6) and 0 <= last["r"]["mean_recall"] <= 100
    assert last["c"]["images"] == 6 and 100 >= last["c"]["top5"] >= last["c"]["top1"] >= 0
    assert {r["set"] for r in read_log(tmp_path / "run", "eval")} == {"r", "c"}
