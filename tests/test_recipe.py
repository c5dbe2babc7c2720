import pytest

from cnclip.corpus.recipe import RecipeError, load_recipe
from conftest import REPO

SHIPPED = ["demo.yaml", "laion-zh.yaml", "wukong.yaml"]


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_recipes_validate(name):
    recipe = load_recipe(REPO / "recipes" / name)
    assert recipe.sources


def test_laion_recipe_has_the_papers_rules():
    recipe = load_recipe(REPO / "recipes" / "laion-zh.yaml")
    assert (recipe.text.min_chars, recipe.text.max_chars, recipe.image.size) == (5, 50, 224)
    assert recipe.sources[0].where == "LANGUAGE = 'zh'"


def write(tmp_path, text):
    path = tmp_path / "r.yaml"
    path.write_text(text, encoding="utf-8")
    return path


BASE = """
name: t
output_dir: out
manifest_dir: man
sources:
  - {name: a, kind: metadata, path: x.parquet}
"""


@pytest.mark.parametrize(
    "extra, expected",
    [
        ("text: {min_chars: five}", "text.min_chars: Input should be a valid integer"),
        ("text: {min_char: 3}", "text.min_char: unknown key"),
        ("text: {min_chars: 60, max_chars: 50}", "text: Value error, min_chars (60) is larger than max_chars (50)"),
        ("image: {resize_mode: squash}", "image.resize_mode: Input should be"),
        ("download: {processes: 0}", "download.processes: Input should be greater than or equal to 1"),
    ],
)
def test_errors_name_file_and_key(tmp_path, extra, expected):
    path = write(tmp_path, BASE + extra + "\n")
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    message = str(err.value)
    assert message.startswith(f"{path}: ")
    assert expected in message
    assert len(message.splitlines()) == 1


def test_source_errors_point_into_the_list(tmp_path):
    path = write(tmp_path, BASE.replace("kind: metadata, path: x.parquet", "kind: metadata, paht: x.parquet"))
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    lines = str(err.value).splitlines()
    assert f"{path}: sources[0].path: Field required" in lines
    assert f"{path}: sources[0].paht: unknown key" in lines


def test_unknown_source_kind_and_duplicate_names(tmp_path):
    bad_kind = write(tmp_path, BASE.replace("kind: metadata", "kind: torrent"))
    with pytest.raises(RecipeError, match=r"sources\[0\]: Input tag 'torrent'"):
        load_recipe(bad_kind)
    twice = write(tmp_path, BASE + "  - {name: a, kind: metadata, path: y.parquet}\n")
    with pytest.raises(RecipeError, match="source names must be unique, repeated: a"):
        load_recipe(twice)


def test_reserved_keep_columns_and_yaml_errors(tmp_path):
    reserved = write(tmp_path, BASE.replace("path: x.parquet", "path: x.parquet, keep_columns: [sha256]"))
    with pytest.raises(RecipeError, match=r"sources\[0\].keep_columns: Value error, names reserved"):
        load_recipe(reserved)
    broken = write(tmp_path, "name: [unclosed\n")
    with pytest.raises(RecipeError, match=r"r.yaml: line \d+: invalid YAML"):
        load_recipe(broken)
    with pytest.raises(RecipeError, match="cannot read recipe"):
        load_recipe(tmp_path / "missing.yaml")
