"""The schema module: every file a build writes has its declared columns and types, a writer
refuses a frame that does not, keep columns never take a name the build uses, and
manifests/README.md's tables say what the module declares.

One small build (a CSV over loopback with a bad line, a 404, a too-short caption, a repeated
pair and an exact copy of an image), keeping `download_score` and `_id`: names the recipe used to
refuse although the build writes no such column.
"""

import fnmatch
import random
import re

import polars as pl
import pytest

from cnclip._common.errors import CnclipError
from cnclip.corpus import build, parse_recipe
from cnclip.corpus.manifests.schemas import (
    HASHES,
    REJECTED,
    SAMPLES,
    TABLES,
    TEXT_ACCEPTED,
    SchemaError,
    Table,
    reserved_columns,
)
from cnclip.corpus.recipe import RecipeError
from cnclip.corpus.sources.sample_web import SampleWebServer, draw_shape
from conftest import REPO


def recipe_data(tmp_path, keep_columns, path="list.csv"):
    return {
        "name": "schemas", "output_dir": str(tmp_path / "out"), "manifest_dir": str(tmp_path / "manifests"),
        "sources": [{"name": "csv", "kind": "metadata", "path": str(tmp_path / path), "url_column": "link",
                     "caption_column": "alt", "keep_columns": keep_columns}],
        "image": {"size": 32, "min_side": 16},
        "download": {"processes": 1, "threads": 8, "timeout": 3, "retries": 0, "samples_per_part": 50,
                     "allow_networks": ["127.0.0.1/32"], "per_host_delay": 0, "per_host_concurrency": 64},
        "shard": {"samples_per_shard": 2, "processes": 1},
        "text": {"processes": 1},
        "dedup": {"processes": 1},
    }


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("schemas")
    site = root / "site"
    site.mkdir()
    for i in range(3):
        draw_shape((200, 60 * i, 30), "圆形", random.Random(i)).save(site / f"{i}.png")
    (site / "copy.png").write_bytes((site / "0.png").read_bytes())
    with SampleWebServer(site, port=0) as web:
        lines = ["link,alt,download_score,_id"]
        lines += [f"{web.base_url}/{i}.png,第{i}张红绿蓝圆形图片,{10 + i},id-{i}" for i in range(3)]
        lines += [f"{web.base_url}/404.png,一张不存在的图片啊,13,id-3",
                  f"{web.base_url}/1.png,cat,14,id-4",
                  f"{web.base_url}/1.png,第1张红绿蓝圆形图片,15,id-5",
                  f"{web.base_url}/copy.png,复制的一张圆形图片,16,id-6"]
        data = "\n".join(lines).encode() + b"\nhttp://x/\xff.png,\xff\xfe,17,id-7\n"
        (root / "list.csv").write_bytes(data)
        recipe = parse_recipe(recipe_data(root, ["download_score", "_id"]), "test-recipe")
        # Which table each file was written through (the stages run inline with 1 process).
        written, write = {}, Table.write

        def spy(table, frame, path):
            write(table, frame, path)
            written[path] = table.name

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(Table, "write", spy)
            funnel = build(recipe, show_funnel=False)
    return recipe, funnel, written


def table_of(relative: str, root: str):
    found = [t for t in TABLES if t.root == root and fnmatch.fnmatch(relative, t.name)]
    assert len(found) <= 1, relative
    return found[0] if found else None


@pytest.mark.slow
def test_every_file_a_build_writes_has_its_declared_schema(built):
    recipe, funnel, written = built
    covered, unknown = set(), []
    for folder, name in ((recipe.output_dir, "output_dir"), (recipe.manifest_dir, "manifest_dir")):
        for path in sorted(folder.rglob("*.parquet")):
            relative = path.relative_to(folder).as_posix()
            if relative.startswith("work/download/") and relative != "work/download/attempts.parquet":
                continue  # img2dataset's own input and output parts: its format, not ours
            table = table_of(relative, name)
            if table is None:
                unknown.append(relative)
                continue
            table.check_file(path)
            assert written.get(path) == table.name, relative  # validated when written, as this table
            covered.add(table.name)
    assert unknown == []
    # Every table but the crawl's pairs (no html or warc source here), the embed stage's, semantic
    # dedup's and embeddings' (no embed section) and the translate stage's (no translate section; checked in
    # test_translate_build.py) was written and checked.
    assert covered == {t.name for t in TABLES} - {"work/crawl/*.parquet", "work/embed/*.parquet",
                                                  "work/embed-scores/*.parquet", "work/embed-members.parquet",
                                                  "work/embed-decisions.parquet", "embeddings/*.parquet",
                                                  "work/translate/parts/*.parquet", "work/translate/todo.parquet",
                                                  "work/translate-cache/*.parquet",
                                                  "work/embed-semantic/sample/*.parquet",
                                                  "work/embed-semantic/centroids.parquet",
                                                  "work/embed-semantic/assigned/*.parquet",
                                                  "work/embed-semantic/decisions/*.parquet"}
    # The bad line made the ingest part carry the optional verdict columns, typed as declared.
    ingest = pl.read_parquet(recipe.output_dir / "work" / "ingest" / "000-00000.parquet")
    assert ingest.filter(pl.col("reason").is_not_null()).select("row", "reason", "detail").rows() == [
        (7, "ingest:bad_row", "line 9: invalid UTF-8")]
    reasons = pl.read_parquet(recipe.manifest_dir / "rejected" / "*.parquet")["reason"].sort().to_list()
    assert reasons == ["dedup:exact_duplicate", "download:failed_to_download", "ingest:bad_row",
                       "text:duplicate_pair", "text:too_short"]


@pytest.mark.slow
def test_download_prefixed_keep_columns_reach_samples_and_tars(built):
    recipe, funnel, _ = built
    samples = pl.read_parquet(recipe.manifest_dir / "samples" / "*.parquet").sort("row")
    assert samples.columns[-2:] == ["download_score", "_id"]
    assert samples.select("row", "download_score", "_id").rows() == [
        (0, "10", "id-0"), (1, "11", "id-1"), (2, "12", "id-2")]
    rejected = pl.read_parquet(recipe.manifest_dir / "rejected" / "*.parquet").sort("row")
    assert rejected.select("row", "download_score").rows() == [(3, "13"), (4, "14"), (5, "15"), (6, "16"),
                                                               (7, None)]
    assert funnel["samples"] == 3


def refusal(tmp_path, keep_columns) -> str:
    with pytest.raises(RecipeError) as err:
        parse_recipe(recipe_data(tmp_path, keep_columns), "r.yaml", check_paths=False)
    return str(err.value)


def test_a_keep_column_the_build_writes_is_a_one_line_error_naming_it(tmp_path):
    message = refusal(tmp_path, ["score", "phash"])
    assert message == (
        "r.yaml: sources[0].keep_columns: Value error, names reserved by the manifests: phash "
        "(keep_columns[1] 'phash' is a column the build writes in work/hash/*.parquet, work/shard/plan.parquet, "
        "samples/*.parquet) (got ['score', 'phash'])")


@pytest.mark.parametrize("name, where", [
    ("first_uid", "writes in work/text/duplicate_pairs.parquet"),
    ("caption_count", "writes in work/text/repeated_captions.parquet"),
    ("duplicate_of_eval", "writes in work/dedup/decisions.parquet"),
    ("download_key", "writes in work/shard/plan.parquet"),
    ("status", "writes in work/download/attempts.parquet"),
    ("position", "writes in work/shard/plan.parquet"),
    ("_line", "uses in memory, numbering a text file's lines"),
])
def test_work_file_and_in_memory_columns_are_refused_too(tmp_path, name, where):
    message = refusal(tmp_path, ["ok", name])
    assert len(message.splitlines()) == 1
    assert f"(keep_columns[1] '{name}' is a column the build {where}" in message


def test_every_column_of_every_table_is_refused(tmp_path):
    names = {n for t in TABLES if t.reserves for n in t.declared}
    assert names <= set(reserved_columns())
    message = refusal(tmp_path, sorted(names))
    assert all(f"'{n}' is a column the build" in message for n in names)


@pytest.mark.parametrize("name", ["download_score", "download", "_id", "page_url", "case", "Phash"])
def test_names_the_build_does_not_use_may_be_kept(tmp_path, name):
    recipe = parse_recipe(recipe_data(tmp_path, [name]), "r.yaml", check_paths=False)
    assert recipe.sources[0].keep_columns == [name]


def test_a_writer_refuses_a_frame_that_is_not_its_table(tmp_path):
    target = tmp_path / "00000.parquet"
    cases = [
        (HASHES, pl.DataFrame({"uid": [1]}), "no column 'phash' (declared UInt64)"),
        (HASHES, pl.DataFrame({"uid": [1], "phash": [5]}), "column 'phash' is Int64, declared UInt64"),
        (HASHES, pl.DataFrame({"uid": [1], "phash": [5], "extra": [1]}, schema_overrides={"phash": pl.UInt64}),
         "column 'extra' is not declared"),
        (TEXT_ACCEPTED,
         pl.DataFrame({**{n: [None] for n in TEXT_ACCEPTED.columns}, "first_uid": [1]},
                      schema_overrides=dict(TEXT_ACCEPTED.columns)).lazy(),
         "column 'first_uid' is not declared here (a column the build writes in work/text/duplicate_pairs.parquet)"),
    ]
    for table, frame, problem in cases:
        with pytest.raises(SchemaError) as err:
            table.write(frame, target)
        assert str(err.value) == f"{target}: {problem} (table {table.name} in manifests/schemas.py)"
        assert not target.exists() and list(tmp_path.iterdir()) == []
    # A bug, not a user's mistake: the CLI keeps its traceback.
    assert not issubclass(SchemaError, CnclipError)


def test_manifest_parts_must_have_their_columns_in_order(tmp_path):
    frame = pl.DataFrame(schema={**SAMPLES.columns, "case": pl.String})
    swapped = frame.select("shard", "key", pl.exclude("shard", "key"))
    with pytest.raises(SchemaError, match=r"columns out of order: shard, key, uid"):
        SAMPLES.write(swapped, tmp_path / "00000.parquet")
    SAMPLES.write(frame, tmp_path / "00000.parquet")
    SAMPLES.check_file(tmp_path / "00000.parquet")
    with pytest.raises(SchemaError, match=r"no column 'sha256'"):
        REJECTED.validate(pl.DataFrame(schema=REJECTED.columns).drop("sha256"), "rejected/x.parquet")


# --- manifests/README.md ------------------------------------------------------------------------


def readme_table(heading: str) -> list[list[str]]:
    """The rows (cells) of the first table after `## heading` in manifests/README.md."""
    text = (REPO / "manifests" / "README.md").read_text(encoding="utf-8")
    section = text.split(f"\n## {heading}\n", 1)[1]
    lines = section[section.index("\n|"):].strip().splitlines()
    rows = []
    for line in lines[2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split(" | ")])
    return rows


def type_name(dtype: pl.DataType) -> str:
    """As the README names types; an embedding (an array of the model's width) is `float16[width]`."""
    if isinstance(dtype, pl.Array):
        return f"{type_name(dtype.inner)}[width]"
    return str(dtype).lower()


@pytest.mark.parametrize("heading, table", [("samples/", SAMPLES), ("rejected/", REJECTED)])
def test_the_manifest_readme_tables_are_the_schemas(heading, table):
    rows = readme_table(heading)
    assert rows[-1][0] == "*keep_columns*"
    documented = [(name, type_) for first, type_, *_ in rows[:-1] for name in re.findall(r"`(\w+)`", first)]
    assert documented == [(name, type_name(dtype)) for name, dtype in table.columns.items()]


def test_the_work_files_readme_table_is_the_schemas():
    documented = {}
    for file, stage, columns, _ in readme_table("Work files"):
        items = columns.split(", ")
        keep = items[-1] == "*keep_columns*"
        parsed = [re.fullmatch(r"`(\w+)` ([\w\[\]]+)(\??)", item) for item in items[: len(items) - keep]]
        assert all(parsed), columns
        documented[file.strip("`")] = (stage, keep, [m.groups() for m in parsed])
    declared = {
        t.name: (t.stage, t.keep_columns, [(n, type_name(d), "") for n, d in t.columns.items()]
                 + [(n, type_name(d), "?") for n, d in t.optional.items()])
        for t in TABLES if t.root == "output_dir"
    }
    assert documented == declared
