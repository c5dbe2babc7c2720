"""The translate stage's recipe block, its backends and its cache, unit-level (no download): a tiny
Marian model made by the test (hf, and converted for ctranslate2), and the dictionary script as a
`command` backend with every way a user's program can fail."""

import json
import sys
from pathlib import Path

import polars as pl
import pytest
import torch

from cnclip.corpus import parse_recipe, run_text
from cnclip.corpus.ops.translate_backends import CommandBackend, TranslateError, backend_identity, load_backend
from cnclip.corpus.pipeline import stage_states
from cnclip.corpus.recipe import RecipeError
from cnclip.corpus.recipe.translate import TranslateSettings
from translate_models import converted, tiny_marian

SCRIPT = str(Path(__file__).with_name("translate_dictionary.py"))
CAPTIONS = ["a red square", "a green circle on white background", "a blue triangle", "square", "red red red"]


@pytest.fixture(scope="module")
def marian(tmp_path_factory):
    return tiny_marian(tmp_path_factory.mktemp("marian") / "model")


def recipe_data(tmp_path, translate, captions=CAPTIONS):
    rows = [{"url": f"http://127.0.0.1:9/{i}.png", "caption": text} for i, text in enumerate(captions)]
    (tmp_path / "en.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return {"name": "t", "output_dir": str(tmp_path / "out"), "manifest_dir": str(tmp_path / "manifests"),
            "sources": [{"name": "en", "kind": "metadata", "path": str(tmp_path / "en.jsonl")}],
            # the tiny model's output is not Chinese: let every translation through the text filters
            "text": {"processes": 1, "min_cjk_ratio": 0.0, "min_chars": 0, "max_chars": 200,
                     "reject_filenames": False},
            "translate": translate}


def command(tmp_path, *flags):
    return {"sources": ["en"], "backend": "command", "command": [sys.executable, SCRIPT, str(tmp_path / "n"), *flags]}


# --- the recipe block -----------------------------------------------------------------------------


@pytest.mark.parametrize("translate, message", [
    ({"sources": ["coco"], "backend": "command", "command": ["x"]},
     "test-recipe: translate.sources[0]: no source named 'coco' (sources: en)"),
    ({"sources": ["en"], "backend": "hf"},
     "test-recipe: translate: Value error, backend hf needs `model` (a local model folder)"),
    ({"sources": ["en"], "backend": "command", "command": ["x"], "model": "m"},
     "test-recipe: translate: Value error, model is a setting of backends hf and ctranslate2 (backend is command)"),
    ({"sources": ["en"], "backend": "command"},
     "test-recipe: translate: Value error, backend command needs `command` (the program and its arguments)"),
    ({"sources": ["en"], "backend": "hf", "model": "no/such/folder"},
     "test-recipe: translate.model: no such model folder 'no/such/folder'"),
    ({"sources": ["en"], "backend": "deepl", "command": ["x"]}, "test-recipe: translate.backend: Input should be"),
])
def test_a_bad_translate_block_is_one_line_naming_the_key(tmp_path, translate, message):
    with pytest.raises(RecipeError) as err:
        parse_recipe(recipe_data(tmp_path, translate), "test-recipe")
    assert str(err.value).startswith(message) and "\n" not in str(err.value), str(err.value)


def test_caption_en_is_the_builds_own_column_not_a_keep_column(tmp_path):
    data = recipe_data(tmp_path, command(tmp_path))
    data["sources"][0]["keep_columns"] = ["caption_en"]
    with pytest.raises(RecipeError, match=r"keep_columns\[0\] 'caption_en' is a column the build writes in "
                                          r"work/translate/parts/\*\.parquet"):
        parse_recipe(data, "r")


def test_a_recipe_without_translate_has_no_translate_stage(tmp_path):
    data = recipe_data(tmp_path, None)
    del data["translate"]
    assert "translate" not in stage_states(parse_recipe(data, "r"))


# --- the command backend ----------------------------------------------------------------------------


def settings(**values) -> TranslateSettings:
    return TranslateSettings(**{"sources": ["en"], **values})


def test_the_command_backend_leaves_unknown_captions_untranslated(tmp_path):
    backend = CommandBackend(settings(backend="command", batch_size=2, command=command(tmp_path)["command"]))
    out = backend.translate(["a red square", "a purple hexagon", "a blue triangle"])
    assert out == ["一个红色的方形图案", None, "一个蓝色的三角形图案"]
    assert (tmp_path / "n").read_text().split() == ["2", "1"]  # one run per batch


@pytest.mark.parametrize("flag, tail", [
    ("--fail", "exited with status 3 (dictionary.tsv: no such file)"),
    ("--garbage", "output line 1 is not JSON {\"id\", \"text\"} (JSONDecodeError: 'translated!'; nothing on stderr)"),
])
def test_a_failing_command_is_one_line_naming_it(tmp_path, flag, tail):
    argv = command(tmp_path, flag)["command"]
    with pytest.raises(TranslateError) as err:
        CommandBackend(settings(backend="command", command=argv)).translate(["a red square"])
    assert str(err.value) == f"translate.command {' '.join(argv)}: {tail}"


def test_a_command_that_does_not_exist_is_one_line(tmp_path):
    with pytest.raises(TranslateError, match=r"^translate.command /no/such/program: cannot start it \(No such file"):
        CommandBackend(settings(backend="command", command=["/no/such/program"])).translate(["x"])


def test_a_failing_command_stops_the_build_before_the_text_stage(tmp_path):
    recipe = parse_recipe(recipe_data(tmp_path, command(tmp_path, "--fail")), "r")
    with pytest.raises(TranslateError, match="exited with status 3"):
        run_text(recipe)
    assert not (tmp_path / "out" / "work" / "text").exists()


# --- the hf backend: a tiny Marian model ------------------------------------------------------------


def test_the_hf_backend_translates_every_caption_in_batches(marian, monkeypatch):
    backend = load_backend(settings(backend="hf", model=str(marian), batch_size=2, device="cpu", max_new_tokens=6))
    sizes, generate = [], backend.model.generate

    def counted(**batch):
        sizes.append(batch["input_ids"].shape[0])
        return generate(**batch)

    monkeypatch.setattr(backend.model, "generate", counted)
    out = backend.translate(CAPTIONS)
    assert sizes == [2, 2, 1]
    assert len(out) == len(CAPTIONS) and all(isinstance(text, str) and text for text in out)
    assert backend.device == "cpu" and next(backend.model.parameters()).dtype == torch.float32


def test_hf_translations_are_cached_and_a_rerun_translates_nothing(tmp_path, marian, capfd):
    captions = [*CAPTIONS, CAPTIONS[0]]  # a repeated caption is translated once
    translate = {"sources": ["en"], "backend": "hf", "model": str(marian), "batch_size": 2, "device": "cpu",
                 "max_new_tokens": 6}
    recipe = parse_recipe(recipe_data(tmp_path, translate, captions), "r")
    assert run_text(recipe)["accepted"] == len(captions)
    assert "Loading weights" not in capfd.readouterr().err  # transformers' bars stay off the terminal
    summary = stage_states(recipe)["translate"].summary
    assert (summary["captions"], summary["translated"], summary["cached"], summary["failed"]) == (5, 5, 0, 0)
    cache = pl.read_parquet(tmp_path / "out" / "work" / "translate-cache" / "*.parquet")
    assert sorted(cache["text"].to_list()) == sorted(CAPTIONS)
    assert cache["model"].unique().to_list() == [backend_identity(recipe.translate)]
    accepted = pl.read_parquet(tmp_path / "out" / "work" / "text" / "accepted" / "*.parquet").sort("uid")
    translation = dict(cache.select("text", "translation").rows())
    assert accepted["caption_en"].to_list() == captions
    assert accepted["caption_raw"].to_list() == [translation[text] for text in captions]

    # Another batch size redoes the stage; every caption comes from the cache (no model loaded).
    again = parse_recipe(recipe_data(tmp_path, {**translate, "batch_size": 3}, captions), "r")
    run_text(again)
    summary = stage_states(again)["translate"].summary
    assert (summary["captions"], summary["translated"], summary["cached"]) == (5, 0, 5)
    # Other weights are another model: nothing of the cache is theirs.
    weights, identity = marian / "model.safetensors", backend_identity(recipe.translate)
    original = weights.read_bytes()
    try:
        tiny_marian(marian, seed=1)
        assert backend_identity(recipe.translate) != identity
    finally:
        weights.write_bytes(original)
    assert backend_identity(recipe.translate) == identity


def test_a_folder_that_is_no_model_is_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(TranslateError, match=rf"^translate.model: {tmp_path / 'empty'}: no tokenizer loads from it"):
        load_backend(settings(backend="hf", model=str(tmp_path / "empty"), device="cpu"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="asks for a GPU on a machine without one")
def test_cuda_asked_for_without_a_gpu_is_one_line(marian):
    with pytest.raises(TranslateError, match="^translate.device: cuda, but no CUDA device is visible to torch$"):
        load_backend(settings(backend="hf", model=str(marian), device="cuda"))


# --- the ctranslate2 backend: the same model, converted -----------------------------------------------


def test_the_ctranslate2_backend_agrees_with_hf_on_the_converted_model(tmp_path, marian):
    folder = converted(marian, tmp_path / "ct2")
    assert (folder / "model.bin").is_file() and (folder / "tokenizer.json").is_file()
    common = {"batch_size": 2, "device": "cpu", "max_new_tokens": 6}
    hf = load_backend(settings(backend="hf", model=str(marian), **common)).translate(CAPTIONS)
    ct2 = load_backend(settings(backend="ctranslate2", model=str(folder), **common)).translate(CAPTIONS)
    assert len(ct2) == len(CAPTIONS) and all(isinstance(text, str) and text for text in ct2)
    # Greedy decoding of the same float32 weights: the same tokens (hf counts the end token in its
    # max_new_tokens, CTranslate2 does not, so its output may run one token longer).
    for ours, theirs in zip(hf, ct2, strict=True):
        assert theirs.split()[:len(ours.split())] == ours.split()


def test_ctranslate2_over_a_folder_that_is_not_converted_is_one_line(marian):
    with pytest.raises(TranslateError, match=rf"^translate.model: {marian}: not a CTranslate2 model folder"):
        load_backend(settings(backend="ctranslate2", model=str(marian), device="cpu"))
