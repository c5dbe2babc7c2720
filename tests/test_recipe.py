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


# --- a bad recipe runs nothing -------------------------------------------------------------------


def one_line_error(path):
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    message = str(err.value)
    assert len(message.splitlines()) == 1, message
    return message


def test_duplicate_keys_are_errors(tmp_path):
    path = write(tmp_path, BASE + "text: {min_chars: 3}\nimage: {size: 64}\ntext: {min_chars: 9}\n")
    assert one_line_error(path) == f"{path}: line 9: invalid YAML (duplicate key 'text' (first on line 7))"
    nested = write(tmp_path, BASE + "text:\n  min_chars: 3\n  min_chars: 4\n")
    assert "line 9: invalid YAML (duplicate key 'min_chars' (first on line 8))" in one_line_error(nested)
    # A merge key may still be overridden: that is what it is for.
    merged = write(tmp_path, BASE.replace("path: x.parquet", "path: '*.parquet'")
                   + "defaults: &d {min_chars: 3, max_chars: 9}\n")
    with pytest.raises(RecipeError, match="defaults: unknown key"):
        load_recipe(merged)


def test_non_utf8_recipe_is_one_line(tmp_path):
    path = tmp_path / "r.yaml"
    data = BASE.encode() + "text: {blacklist: 黑名单.txt}\n".encode("gb18030")  # saved by a GBK editor
    path.write_bytes(data)
    offset = len(BASE.encode()) + len("text: {blacklist: ")
    assert one_line_error(path) == (
        f"{path}: line {BASE.count(chr(10)) + 1}: recipe is not UTF-8 text "
        f"(byte 0x{data[offset]:02x} at offset {offset})")


BOMB = "\n".join(
    ["a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    + [f"{c}: &{c} [{', '.join(['*' + p] * 9)}]" for p, c in zip("abcdefgh", "bcdefghi", strict=True)]
) + "\n"


def test_alias_bomb_is_refused_cheaply(tmp_path):
    import tracemalloc

    from cnclip.train.config import ConfigError, load_config

    assert len(BOMB) < 400  # 9^9 = 387 million strings once expanded
    recipe = write(tmp_path, BASE + BOMB)
    config = tmp_path / "c.yaml"
    config.write_text(BOMB, encoding="utf-8")
    tracemalloc.start()
    try:
        message = one_line_error(recipe)
        with pytest.raises(ConfigError, match="expands to more than 100000 YAML nodes"):
            load_config(config)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert message == f"{recipe}: recipe expands to more than 100000 YAML nodes through its aliases (an alias bomb?)"
    assert peak < 100 * 2**20


def test_recursive_alias_is_refused(tmp_path):
    path = write(tmp_path, BASE + "text: &t {blacklist: *t}\n")
    assert "an alias refers to its own anchor" in one_line_error(path)


def test_validation_errors_never_repr_the_whole_input():
    import tracemalloc

    from pydantic import ValidationError

    from cnclip._common.strict import format_validation_error
    from cnclip.corpus.recipe import TextSettings

    shared = [list(range(1000))] * 1000  # what aliases make: one list referenced a thousand times
    with pytest.raises(ValidationError) as err:
        TextSettings.model_validate({"min_chars": shared})
    tracemalloc.start()
    try:
        message = format_validation_error("r.yaml", err.value)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert message.startswith("r.yaml: min_chars: Input should be a valid integer (got [[0, 1, 2, 3, ...], [0")
    assert message.endswith(")")
    assert len(message) == len("r.yaml: min_chars: Input should be a valid integer (got )") + 60
    assert peak < 2**20  # a plain repr would first build all of its 4.9 million characters


@pytest.mark.parametrize("name", ["", "../escape", "a/b", "a\\b", ".hidden", "a..b", "名字 有空格", "x" * 65, "-x"])
def test_source_names_are_safe(tmp_path, name):
    path = write(tmp_path, BASE.replace("name: a,", f"name: {name!r},"))
    assert "sources[0].name: Value error, " in one_line_error(path)
    assert "is not a safe source name" in one_line_error(path)


def test_safe_source_names_load(tmp_path):
    path = write(tmp_path, BASE.replace("{name: a, kind: metadata, path: x.parquet}",
                                        "{name: 悟空-v1.2_zh, kind: metadata, path: 'x-*.parquet'}"))
    assert load_recipe(path).sources[0].name == "悟空-v1.2_zh"


GLOB_BASE = BASE.replace("path: x.parquet", "path: 'x-*.parquet'")


@pytest.mark.parametrize(
    "extra, expected",
    [
        ("shard: {samples_per_shard: 0}", "shard.samples_per_shard: Input should be greater than or equal to 1"),
        ("shard: {samples_per_shard: 1000000000}", "shard.samples_per_shard: Input should be less than or equal to"),
        ("image: {size: 100000}", "image.size: Input should be less than or equal to 8192"),
        ("download: {processes: 100000}", "download.processes: Input should be less than or equal to 1024"),
        ("download: {threads: 5000}", "download.threads: Input should be less than or equal to 1024"),
        ("download: {samples_per_part: 0}", "download.samples_per_part: Input should be greater than or equal to 1"),
        ("text: {processes: 99999}", "text.processes: Input should be less than or equal to 1024"),
        ("crawl: {workers: 0}", "crawl.workers: Input should be greater than or equal to 1"),
        ('download: {user_agent: "cnclip\\r\\nX-Injected: 1"}',
         "download.user_agent: Value error, has a control character (U+000D)"),
        ('download: {user_agent_token: "cnclip\\u0000"}',
         "download.user_agent_token: Value error, has a control character (U+0000)"),
        ('crawl: {user_agent: "bot\\u0085"}', "crawl.user_agent: Value error, has a control character (U+0085)"),
        ('crawl: {user_agent: "爬虫"}', "crawl.user_agent: Value error, has a non-ASCII character (U+722C)"),
    ],
)
def test_bounds_and_user_agents(tmp_path, extra, expected):
    message = one_line_error(write(tmp_path, GLOB_BASE + extra + "\n"))
    assert expected in message


@pytest.mark.parametrize("port, ok", [(0, False), (1, True), (65535, True), (65536, False)])
def test_sample_web_port(tmp_path, port, ok):
    path = write(tmp_path, GLOB_BASE + f"  - {{name: web, kind: sample_web, port: {port}}}\n")
    if ok:
        assert load_recipe(path).sources[1].port == port
    else:
        assert "sources[1].port: Input should be" in one_line_error(path)


def test_every_named_path_is_checked_at_load(tmp_path):
    (tmp_path / "lists").mkdir()
    text = f"""
name: t
output_dir: out
manifest_dir: man
sources:
  - {{name: a, kind: metadata, path: {tmp_path}/nope.parquet}}
  - {{name: b, kind: metadata, path: "{tmp_path}/lists/*.parquet"}}
  - {{name: c, kind: metadata, path: "s3://bucket/laion/part-0.parquet"}}
  - {{name: d, kind: warc, path: {tmp_path}/lists}}
  - {{name: e, kind: html, seeds_file: {tmp_path}/seeds.txt}}
text: {{blacklist: {tmp_path}/block.txt}}
dedup: {{eval_images: [{tmp_path}/lists, {tmp_path}/coco-cn.parquet, "{tmp_path}/eval-*.tar"]}}
"""
    path = write(tmp_path, text)
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    assert str(err.value).splitlines() == [
        f"{path}: sources[0].path: no such file '{tmp_path}/nope.parquet'",
        f"{path}: sources[3].path: '{tmp_path}/lists' is a folder, not a file",
        f"{path}: sources[4].seeds_file: no such file '{tmp_path}/seeds.txt'",
        f"{path}: text.blacklist: no such file '{tmp_path}/block.txt'",
        f"{path}: dedup.eval_images[1]: no such file or folder '{tmp_path}/coco-cn.parquet'",
        f"{path}: dedup.eval_images[2]: the glob '{tmp_path}/eval-*.tar' matches nothing",
    ]
    for name in ("nope.parquet", "seeds.txt", "block.txt", "coco-cn.parquet", "eval-0.tar"):
        (tmp_path / name).write_text("x\n", encoding="utf-8")
    fixed = write(tmp_path, text.replace(f"path: {tmp_path}/lists}}", f"path: {tmp_path}/nope.parquet}}"))
    assert load_recipe(fixed).text.blacklist == f"{tmp_path}/block.txt"


def test_readers_of_a_finished_build_need_not_have_its_inputs(tmp_path):
    # Training from `data.corpus` reads only the output folders; the metadata may be gone.
    path = write(tmp_path, BASE.replace("path: x.parquet", f"path: {tmp_path}/deleted.parquet"))
    assert "sources[0].path: no such file" in one_line_error(path)
    assert load_recipe(path, check_paths=False).sources[0].path == f"{tmp_path}/deleted.parquet"


def test_cli_refuses_a_bomb_and_a_missing_blacklist_before_any_work(tmp_path):
    import subprocess
    import sys

    bomb = write(tmp_path, BASE + BOMB)
    typo = tmp_path / "typo.yaml"
    typo.write_text(GLOB_BASE + "text: {blacklist: blocklist.txt}\n", encoding="utf-8")
    for recipe, expected in [
        (bomb, f"error: {bomb}: recipe expands to more than 100000 YAML nodes through its aliases (an alias bomb?)"),
        (typo, f"error: {typo}: text.blacklist: no such file 'blocklist.txt'"),
    ]:
        result = subprocess.run([sys.executable, "-m", "cnclip.cli", "corpus", "build", str(recipe)],
                                capture_output=True, text=True, cwd=tmp_path, timeout=120)
        assert result.returncode == 2
        assert [line for line in result.stderr.splitlines() if line.strip()] == [expected]
        assert not (tmp_path / "out").exists() and not (tmp_path / "man").exists()


def test_training_configs_get_the_same_strict_yaml(tmp_path):
    from cnclip.train.config import ConfigError, load_config

    config = tmp_path / "c.yaml"
    config.write_text("stage1: {lr: 1.0e-4}\nprecision: bf16\nstage1: {lr: 5.0e-4}\n", encoding="utf-8")
    with pytest.raises(ConfigError) as err:
        load_config(config)
    assert str(err.value) == f"{config}: line 3: invalid YAML (duplicate key 'stage1' (first on line 1))"
    config.write_bytes(b"precision: \xff\n")
    with pytest.raises(ConfigError, match=r"c.yaml: line 1: config is not UTF-8 text \(byte 0xff at offset 11\)"):
        load_config(config)


@pytest.mark.parametrize("name", ["phash", "duplicate_of", "status", "download_tar", "_line"])
def test_keep_columns_may_not_shadow_pipeline_columns(tmp_path, name):
    recipe = write(tmp_path, BASE.replace("path: x.parquet", f"path: x.parquet, keep_columns: [{name}]"))
    with pytest.raises(RecipeError, match=rf"keep_columns: Value error, names reserved by the manifests: {name}"):
        load_recipe(recipe)


def test_every_manifest_column_is_reserved():
    from cnclip.corpus.manifests.schemas import REJECTED_SCHEMA, SAMPLE_SCHEMA
    from cnclip.corpus.recipe import RESERVED_COLUMNS

    assert set(SAMPLE_SCHEMA) | set(REJECTED_SCHEMA) <= RESERVED_COLUMNS
