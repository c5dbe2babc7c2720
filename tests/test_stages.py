"""The stage contract (runtime/stage.py) and the engine interface (runtime/engine.py).

The stage list drives build, resume, clean, the funnel and the rejects: a toy stage registered
in it (and nowhere else) runs, resumes, shows in the funnel and rejected/, and is cleaned. The
engine handed to build() is the one every stage uses. The SQL global steps give the rows the
polars code they replaced gave.
"""

from __future__ import annotations

import json
import random

import polars as pl
import pytest

from cnclip.corpus import pipeline
from cnclip.corpus.manifests.schemas import REJECTED_SCHEMA
from cnclip.corpus.ops.phash import hex_digits
from cnclip.corpus.recipe import EngineSettings, RecipeError, TextSettings, parse_recipe
from cnclip.corpus.runtime import engine as engine_module
from cnclip.corpus.runtime.engine import LocalEngine, make_engine
from cnclip.corpus.runtime.layout import BuildLayout
from cnclip.corpus.runtime.stage import Stage, check_order
from cnclip.corpus.stages.download_attempts import write_attempts
from cnclip.corpus.stages.shard import plan_shards
from cnclip.corpus.stages.text import find_global_rejects

# Rows the text stage rejects, all of them: a build over them downloads nothing, so it runs
# every stage in a second or two without img2dataset.
REJECTED_ROWS = {"url": ["http://127.0.0.1:9/a.jpg", "http://127.0.0.1:9/b.jpg", ""],
                 "caption": ["cat", "一只猫", "一只在沙发上睡觉的猫"]}


@pytest.fixture
def small_recipe(make_recipe, tmp_path):
    source = tmp_path / "rows.parquet"
    pl.DataFrame(REJECTED_ROWS).write_parquet(source)

    def make(**sections):
        return make_recipe([{"name": "m", "kind": "metadata", "path": str(source)}], **sections)

    return make


class ToyStage(Stage):
    """Registered only in the list: counts the text stage's rejects, writes a work folder and a
    file in manifest_dir, and adds an (empty) part to rejected/."""

    name = "toy"
    needs = ("text",)
    sections = ("text",)
    runs: list = []

    def outputs(self, layout):
        return (layout.work / "toy", layout.manifest_dir / "toy.json")

    def run(self, context):
        engine, layout = context.engine, context.layout
        parts = sorted(layout.text_rejected_dir.glob("*.parquet"))
        count = engine.rows(engine.sql("SELECT COUNT(*) FROM t", t=engine.scan(parts)))[0][0]
        (layout.work / "toy").mkdir(parents=True, exist_ok=True)
        (layout.work / "toy" / "count.txt").write_text(str(count))
        layout.manifest_dir.mkdir(parents=True, exist_ok=True)
        (layout.manifest_dir / "toy.json").write_text(json.dumps({"count": count}))
        ToyStage.runs.append(engine)
        return {"text_rejects": count}

    def rejects(self, layout, engine, tables):
        return [("toy.parquet", engine.sql("SELECT * FROM accepted WHERE uid < 0", accepted=tables["accepted"]))]


@pytest.fixture
def with_toy(monkeypatch):
    ToyStage.runs = []
    stages = list(pipeline.STAGES)
    stages.insert(stages.index(next(s for s in stages if s.name == "text")) + 1, ToyStage())
    monkeypatch.setattr(pipeline, "STAGES", stages)
    return stages


def test_a_stage_in_the_list_runs_shows_in_the_funnel_and_rejects(small_recipe, with_toy):
    recipe = small_recipe()
    funnel = pipeline.build(recipe, show_funnel=False)
    layout = BuildLayout.of(recipe)
    assert len(ToyStage.runs) == 1
    assert json.loads((layout.manifest_dir / "toy.json").read_text()) == {"count": 3}
    assert json.loads((layout.work / "toy.state.json").read_text())["summary"] == {"text_rejects": 3}
    assert [s["stage"] for s in funnel["stages"]] == ["ingest", "text", "toy", "download", "dedup", "shard"]
    assert funnel["stages"][2] == {"stage": "toy", "in": 0, "out": 0, "rejected": {}}
    toy = pl.read_parquet(layout.rejected_dir / "toy.parquet")
    assert toy.height == 0 and toy.schema == pl.Schema(REJECTED_SCHEMA)
    recorded = json.loads(layout.checksums_path.read_text())["files"]
    assert "rejected/toy.parquet" in recorded


def test_the_list_chains_fingerprints_resumes_and_skips(small_recipe, with_toy):
    recipe = small_recipe()
    pipeline.build(recipe, show_funnel=False)
    pipeline.build(recipe, show_funnel=False)
    assert len(ToyStage.runs) == 1  # up to date: skipped
    states = pipeline.stage_states(recipe)
    states["toy"].reopen()
    pipeline.build(recipe, show_funnel=False)
    assert len(ToyStage.runs) == 2  # interrupted: resumed
    # Every stage after the toy one chains through its fingerprint.
    without = pipeline._states_of(recipe, [s for s in with_toy if s.name != "toy"])
    assert [n for n in ("ingest", "text", "download", "shard")
            if without[n].fingerprint != states[n].fingerprint] == ["download", "shard"]
    changed = pipeline.stage_states(small_recipe(text={"min_chars": 2}))
    assert [n for n, s in changed.items() if s.fingerprint != states[n].fingerprint] == [
        "text", "toy", "download", "hash", "dedup", "shard"]


def test_clean_removes_what_each_listed_stage_declared(small_recipe, with_toy):
    recipe = small_recipe()
    pipeline.build(recipe, show_funnel=False)
    mine = recipe.output_dir / "notes.txt"
    mine.write_text("keep me")
    pipeline.clean(recipe)
    # toy.json is in no marker's list: only the stage list knows it is the build's.
    assert not recipe.manifest_dir.exists()
    assert sorted(p.name for p in recipe.output_dir.iterdir() if p.name != ".cnclip-build.lock") == ["notes.txt"]
    assert mine.read_text() == "keep me"


def test_fresh_removes_a_listed_stages_outputs(small_recipe, with_toy):
    recipe = small_recipe()
    pipeline.build(recipe, show_funnel=False)
    (recipe.manifest_dir / "toy.json").write_text("stale")
    pipeline.build(recipe, show_funnel=False, fresh=True)
    assert len(ToyStage.runs) == 2
    assert json.loads((recipe.manifest_dir / "toy.json").read_text()) == {"count": 3}


def test_a_stage_listed_before_what_it_needs_is_refused():
    toy = ToyStage()
    with pytest.raises(ValueError, match="stage 'toy': listed before \\['text'\\]"):
        check_order([pipeline.STAGES[0], toy, *pipeline.STAGES[1:]])
    text = next(stage for stage in pipeline.STAGES if stage.name == "text")  # by name: optional stages lie between
    with pytest.raises(ValueError, match="'text': listed before \\[\\] or twice"):
        check_order([pipeline.STAGES[0], text, text])


# --- the engine ---------------------------------------------------------------------------------


class CountingEngine:
    """A LocalEngine behind a spy: every map_parts call's description and processes, every query."""

    def __init__(self, processes=1):
        self.inner = LocalEngine(processes)
        self.kind, self.processes = "counting", processes
        self.maps, self.queries = [], 0

    def map_parts(self, fn, parts, description, processes=None):
        self.maps.append((description, processes))
        return self.inner.map_parts(fn, parts, description, processes)

    def sql(self, query, **tables):
        self.queries += 1
        return self.inner.sql(query, **tables)

    def scan(self, paths, schema=None):
        return self.inner.scan(paths, schema)

    def write(self, table, path, schema=None):
        self.inner.write(table, path, schema)

    def rows(self, table):
        return self.inner.rows(table)


def test_the_engine_given_to_build_is_the_one_every_stage_uses(small_recipe, monkeypatch):
    engine = CountingEngine()
    states_made = []
    real_states = pipeline._states_of
    monkeypatch.setattr(pipeline, "_states_of", lambda *a: states_made.append(1) or real_states(*a))

    def refuse(*args, **kwargs):
        raise AssertionError("a stage built its own engine")

    monkeypatch.setattr(engine_module.LocalEngine, "__init__", refuse)
    recipe = small_recipe(shard={"processes": None}, text={"processes": 1})
    funnel = pipeline.build(recipe, show_funnel=False, engine=engine)
    assert funnel["input_rows"] == 3 and funnel["rejected"] == 3
    assert engine.maps == [("ingest: read files", None), ("ingest: number rows", None),
                           ("text: normalize + filter", 1), ("text: duplicates + caption cap", 1),
                           ("hash: pHash of stored images", None), ("shard: write tars", None),
                           ("shard: checksums", None)]
    assert engine.queries >= 6  # pair collapse, cap, plan keys, rejects, funnel counts
    assert states_made == [1]  # stage states computed once per build


def test_build_makes_the_recipes_engine_once(small_recipe, monkeypatch):
    made = []

    def spy(settings):
        made.append(settings)
        return CountingEngine(settings.processes)

    monkeypatch.setattr(pipeline, "make_engine", spy)
    recipe = small_recipe(engine={"processes": 3}, text={"processes": None})
    pipeline.build(recipe, show_funnel=False)
    assert made == [EngineSettings(kind="local", processes=3)]


def test_make_engine_builds_the_named_kind():
    engine = make_engine(EngineSettings(processes=5))
    assert isinstance(engine, LocalEngine) and (engine.kind, engine.processes) == ("local", 5)


BASE = {"name": "t", "output_dir": "out", "manifest_dir": "man",
        "sources": [{"name": "a", "kind": "metadata", "path": "x.parquet"}]}


@pytest.mark.parametrize("block, expected", [
    # kind: spark is an engine now (test_spark_engine.py); an unknown kind is still refused.
    ({"kind": "flink"}, "r.yaml: engine.kind: Input should be 'local' or 'spark' (got 'flink')"),
    ({"processes": 0}, "r.yaml: engine.processes: Input should be greater than or equal to 1 (got 0)"),
    ({"processes": 5000}, "r.yaml: engine.processes: Input should be less than or equal to 1024 (got 5000)"),
    ({"procs": 2}, "r.yaml: engine.procs: unknown key"),
    ({"processes": "many"}, "r.yaml: engine.processes: Input should be a valid integer, unable to parse string as "
                            "an integer (got 'many')"),
    ("local", "r.yaml: engine: Input should be a valid dictionary or instance of EngineSettings (got 'local')"),
])
def test_a_bad_engine_block_is_one_line_naming_the_key(block, expected):
    with pytest.raises(RecipeError) as err:
        parse_recipe({**BASE, "engine": block}, "r.yaml", check_paths=False)
    assert str(err.value) == expected


def test_the_engine_block_defaults_and_stage_processes_default_to_it():
    recipe = parse_recipe({**BASE, "engine": {"processes": 4}, "shard": {"processes": 1}}, "r.yaml",
                          check_paths=False)
    assert recipe.engine == EngineSettings(kind="local", processes=4)
    assert (recipe.text.processes, recipe.dedup.processes, recipe.shard.processes) == (None, None, 1)
    assert parse_recipe(BASE, "r.yaml", check_paths=False).engine == EngineSettings(kind="local", processes=2)
    # The engine does not shape outputs: changing it redoes nothing.
    assert "engine" not in json.dumps([recipe.settings(s) for s in ("text", "dedup", "shard")])


def test_a_stage_processes_setting_overrides_the_engines(tmp_path):
    calls = []
    engine = LocalEngine(4)
    engine._run = lambda fn, parts, workers: (calls.append(workers), iter(map(fn, parts)))[1]
    assert engine.map_parts(abs, [-1, -2], "abs") == [1, 2]
    assert engine.map_parts(abs, [-1, -2], "abs", processes=1) == [1, 2]
    assert calls == [4, 1]


# --- the SQL global steps against the polars code they replaced --------------------------------


def old_global_rejects(parts, settings):
    """The text stage's pair collapse and caption cap as polars code, before they became SQL."""
    rows = pl.concat([pl.scan_parquet(p).select("uid", "url", "caption", "reason") for p in parts]).filter(
        pl.col("reason").is_null())
    first = rows.group_by("url", "caption").agg(pl.col("uid").min().alias("first_uid"))
    duplicates = rows.join(first, on=["url", "caption"]).filter(pl.col("uid") != pl.col("first_uid")).select(
        "uid", "first_uid").collect()
    survivors = rows.join(duplicates.lazy(), on="uid", how="anti")
    counts = survivors.group_by("caption").agg(pl.len().alias("caption_count"))
    repeated = counts.filter(pl.col("caption_count") > settings.max_caption_repeats).collect()
    return duplicates, repeated


def random_text_parts(tmp_path, seed):
    rng = random.Random(seed)
    paths = []
    uid = 0
    for part in range(3):
        rows = []
        for _ in range(rng.randint(0, 40)):
            uid += rng.randint(1, 3)
            url = rng.choice(["http://h/1.jpg", "http://h/2.jpg", "http://h/3.jpg", "http://h/4.jpg"])
            caption = rng.choice(["一只猫", "一只狗", "风景", None, "一只猫 "])
            reason = rng.choice([None, None, None, "text:too_short"])
            rows.append((uid, url, caption, reason))
        path = tmp_path / f"n-{part}.parquet"
        pl.DataFrame(rows, schema={"uid": pl.Int64, "url": pl.String, "caption": pl.String, "reason": pl.String},
                     orient="row").write_parquet(path)
        paths.append(path)
    return paths


@pytest.mark.parametrize("seed", range(5))
def test_pair_collapse_and_caption_cap_give_the_rows_polars_gave(tmp_path, seed):
    parts = random_text_parts(tmp_path, seed)
    settings = TextSettings(max_caption_repeats=2)
    duplicates_path, repeated_path = find_global_rejects(parts, settings, tmp_path)
    duplicates, repeated = old_global_rejects(parts, settings)
    assert duplicates.height > 0
    assert pl.read_parquet(duplicates_path).sort("uid").rows() == duplicates.sort("uid").rows()
    assert sorted(pl.read_parquet(repeated_path).rows(), key=str) == sorted(repeated.rows(), key=str)


def old_plan(layout, per_shard):
    """The shard plan as polars code, before it became SQL."""
    digits = len(str(per_shard - 1))
    successes = pl.scan_parquet(layout.download_dir / "[0-9]*.parquet", include_file_paths="download_parquet").filter(
        pl.col("status") == "success").select(
        "uid", pl.col("key").alias("download_key"),
        pl.col("download_parquet").str.replace(r"\.parquet$", ".tar").str.replace(r"^.*/", "").alias("download_tar"),
        "width", "sha256")
    hashes = pl.scan_parquet(layout.hash_dir / "*.parquet").select("uid", hex_digits(pl.col("phash")).alias("phash"))
    dropped = pl.scan_parquet(layout.dedup_decisions).select("uid")
    accepted = pl.concat([pl.scan_parquet(p) for p in sorted(layout.text_accepted_dir.glob("*.parquet"))],
                         how="diagonal_relaxed")
    return (
        accepted.join(successes, on="uid", how="inner").join(dropped, on="uid", how="anti")
        .join(hashes, on="uid", how="left").sort("uid").with_row_index("position")
        .with_columns((pl.col("position") // per_shard).cast(pl.Int64).alias("shard"))
        .with_columns((pl.col("shard").cast(pl.String).str.zfill(5)
                       + (pl.col("position") % per_shard).cast(pl.String).str.zfill(digits)).alias("key"))
        .select("uid", "caption", "lang", "download_key", "download_tar", "width", "sha256", "phash", "shard", "key")
        .collect()
    )


def write_build_parts(layout, seed):
    """Accepted parts of two sources (one with a keep column), two download parts with failures,
    hashes for most downloads, and dedup drops."""
    rng = random.Random(seed)
    uids = sorted(rng.sample(range(1, 400), 120))
    for folder in (layout.text_accepted_dir, layout.download_dir, layout.hash_dir, layout.dedup_decisions.parent):
        folder.mkdir(parents=True, exist_ok=True)
    half = len(uids) // 2
    pl.DataFrame({"uid": uids[:half], "caption": [f"图{u}" for u in uids[:half]]}).write_parquet(
        layout.text_accepted_dir / "000-00000.parquet")
    pl.DataFrame({"uid": uids[half:], "caption": [f"图{u}" for u in uids[half:]], "lang": ["zh"] * (len(uids) - half)}
                 ).write_parquet(layout.text_accepted_dir / "001-00000.parquet")
    downloaded = [u for u in uids if rng.random() < 0.9]
    for index, chunk in enumerate((downloaded[::2], downloaded[1::2])):
        pl.DataFrame({"uid": chunk, "key": [f"{index}{i:08d}" for i in range(len(chunk))],
                      "status": [rng.choice(["success"] * 4 + ["failed_to_download"]) for _ in chunk],
                      "error_message": [None] * len(chunk), "width": [32] * len(chunk), "height": [32] * len(chunk),
                      "original_width": [64] * len(chunk), "original_height": [64] * len(chunk),
                      "sha256": [f"s{u}" for u in chunk]},
                     schema_overrides={"error_message": pl.String}).write_parquet(layout.download_dir / f"{index:05d}.parquet")
    hashed = [u for u in downloaded if rng.random() < 0.9]
    pl.DataFrame({"uid": hashed, "phash": [rng.getrandbits(64) for _ in hashed]},
                 schema={"uid": pl.Int64, "phash": pl.UInt64}).write_parquet(layout.hash_dir / "00000.parquet")
    drops = [u for u in downloaded if rng.random() < 0.2]
    pl.DataFrame({"uid": drops}, schema={"uid": pl.Int64}).write_parquet(layout.dedup_decisions)
    write_attempts(layout.download_dir)  # img2dataset's results read once, as the download stage does


@pytest.mark.parametrize("seed, per_shard", [(0, 7), (1, 10), (2, 1), (3, 1000)])
def test_the_shard_plan_gives_the_rows_polars_gave(make_recipe, tmp_path, seed, per_shard):
    recipe = make_recipe([{"name": "m", "kind": "metadata", "path": str(tmp_path / "none-*.parquet")}],
                         shard={"samples_per_shard": per_shard})
    layout = BuildLayout.of(recipe)
    write_build_parts(layout, seed)
    expected = old_plan(layout, per_shard)
    assert plan_shards(recipe) == expected.height > 0
    plan = pl.read_parquet(layout.shard_plan).with_columns(hex_digits(pl.col("phash")).alias("phash"))
    assert plan.select(expected.columns).rows() == expected.rows()


@pytest.mark.slow
def test_every_stage_of_a_real_build_runs_on_the_given_engine(make_recipe, tmp_path, monkeypatch):
    """Three local images (two the same bytes) through img2dataset, hashing, dedup and shards:
    every per-part map is the given engine's, and no stage builds one of its own."""
    from PIL import Image

    photos = tmp_path / "photos"
    photos.mkdir()
    for name, colour in (("a", "red"), ("b", "blue")):
        Image.new("RGB", (48, 40), colour).save(photos / f"{name}.png")
    (photos / "c.png").write_bytes((photos / "a.png").read_bytes())
    metadata = tmp_path / "rows.parquet"
    pl.DataFrame({"url": [f"file://{photos / n}.png" for n in "abc"],
                  "caption": ["一只红色的小猫咪", "一只蓝色的小狗狗", "又一只红色的小猫"]}).write_parquet(metadata)
    recipe = make_recipe([{"name": "m", "kind": "metadata", "path": str(metadata)}],
                         download={"allow_local_files": [str(photos)]}, text={"processes": None},
                         shard={"processes": None})
    engine = CountingEngine()
    monkeypatch.setattr(engine_module.LocalEngine, "__init__",
                        lambda *a, **k: (_ for _ in ()).throw(AssertionError("a stage built its own engine")))
    funnel = pipeline.build(recipe, show_funnel=False, engine=engine)
    assert (funnel["samples"], funnel["rejected_by_reason"]) == (2, {"dedup:exact_duplicate": 1})
    assert [d for d, _ in engine.maps] == ["ingest: read files", "ingest: number rows",
                                           "text: normalize + filter", "text: duplicates + caption cap",
                                           "download: rows as sent", "download: part inputs",
                                           "download: attempts per part",
                                           "hash: pHash of stored images", "shard: write tars", "shard: checksums"]
    # No stage setting: the engine's own; the download always has one (its lanes).
    assert all(processes is None for d, processes in engine.maps if not d.startswith("download"))
    assert all(processes == recipe.download.processes for d, processes in engine.maps if d.startswith("download"))


def test_shard_numbers_past_five_digits_keep_every_digit(make_recipe, tmp_path):
    """LPAD cuts longer strings to its width; zfill (the key before SQL) never did."""
    recipe = make_recipe([{"name": "m", "kind": "metadata", "path": str(tmp_path / "none-*.parquet")}],
                         shard={"samples_per_shard": 1})
    layout = BuildLayout.of(recipe)
    for folder in (layout.text_accepted_dir, layout.download_dir, layout.dedup_decisions.parent):
        folder.mkdir(parents=True)
    uids = pl.int_range(0, 100_002, eager=True).cast(pl.Int64).alias("uid")
    pl.DataFrame([uids, uids.cast(pl.String).alias("caption")]).write_parquet(layout.text_accepted_dir / "a.parquet")
    pl.DataFrame([uids, uids.cast(pl.String).alias("key"), pl.repeat("success", len(uids), eager=True).alias("status"),
                  pl.repeat(None, len(uids), dtype=pl.String, eager=True).alias("error_message")]
                 ).with_columns(width=32, height=32, original_width=32, original_height=32, sha256=pl.lit("s")
                                ).write_parquet(layout.download_dir / "00000.parquet")
    pl.DataFrame(schema={"uid": pl.Int64}).write_parquet(layout.dedup_decisions)
    write_attempts(layout.download_dir)
    assert plan_shards(recipe) == 100_002
    plan = pl.read_parquet(layout.shard_plan, columns=["uid", "shard", "key"])
    assert plan.row(0) == (0, 0, "000000") and plan.row(99_999) == (99_999, 99_999, "999990")
    assert plan.rows()[-2:] == [(100_000, 100_000, "1000000"), (100_001, 100_001, "1000010")]
