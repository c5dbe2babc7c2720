"""The embed stage's parts on their own: semantic dedup's rule, the recipe sections, reuse on a
rerun, and the same parts from the Spark engine as from the local one."""

import numpy as np
import polars as pl
import pytest

from cnclip.corpus import build, parse_recipe, run_dedup, run_download, run_text
from cnclip.corpus.ops.semantic_dedup import semantic_duplicates
from cnclip.corpus.recipe import RecipeError
from conftest import free_port
from embed_models import tiny_cnclip_checkpoint


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_semantic_dedup_keeps_the_lowest_uid_and_resolves_chains():
    rng = np.random.default_rng(0)
    base = _unit(rng.normal(size=(40, 32)))
    near = _unit(base[:3] + 0.01 * rng.normal(size=(3, 32)))
    # uids out of order: 7 and 5 are near copies of 100's image, 9 of 101's; 3 of 5's (a chain)
    uids = np.array([*range(100, 140), 7, 5, 9])
    x = np.concatenate([base, near[[0]], near[[0]] * 0 + _unit(near[[0]] + 0.001), near[[1]]])
    found = semantic_duplicates(uids, x, clusters=5, max_similarity=0.95, seed=0)
    assert found["uid"].to_list() == [7, 100, 101]
    pairs = dict(zip(found["uid"].to_list(), found["duplicate_of_uid"].to_list(), strict=True))
    assert pairs == {7: 5, 100: 5, 101: 9}
    assert found["reason"].unique().to_list() == ["dedup:semantic_duplicate"]
    assert found.equals(semantic_duplicates(uids, x, clusters=5, max_similarity=0.95, seed=0))
    assert semantic_duplicates(uids, x, clusters=5, max_similarity=0.9999999, seed=0).height == 0


def _recipe(root, port, **sections):
    data = {"name": "e", "output_dir": str(root / "out"), "manifest_dir": str(root / "manifests"),
            "sources": [{"name": "web", "kind": "sample_web", "images": 30, "port": port}],
            "download": {"processes": 1, "threads": 8, "timeout": 3, "retries": 0, "samples_per_part": 15,
                         "allow_networks": ["127.0.0.1/32"], "per_host_delay": 0, "per_host_concurrency": 64},
            "image": {"size": 64, "min_side": 16}, "shard": {"samples_per_shard": 10, "processes": 1}, **sections}
    return parse_recipe(data, "embed-recipe")


@pytest.mark.parametrize("sections, message", [
    ({"filter": {"clip_score": {"min_score": 0.26}}},
     "embed-recipe: filter.clip_score: needs an embed section (embed.model: the model that scores the pairs)"),
    ({"dedup": {"semantic": {"clusters": 4}}}, "embed-recipe: dedup.semantic: needs an embed section"),
    ({"embed": {"model": "MODEL"}, "filter": {"clip_score": {"min_score": 0.2, "keep_fraction": 0.5}}},
     "filter.clip_score: Value error, give exactly one of min_score and keep_fraction"),
    ({"embed": {"model": "MODEL"}, "filter": {"clip_score": {}}},
     "filter.clip_score: Value error, give exactly one of min_score and keep_fraction"),
    ({"embed": {"model": "missing.pt"}}, "embed-recipe: embed.model: no such model file or folder 'missing.pt'"),
    ({"embed": {"model": "MODEL", "device": "tpu"}}, "embed.device: Input should be 'auto', 'cpu' or 'cuda'"),
])
def test_recipe_errors_name_the_key(tmp_path, sections, message):
    model = tmp_path / "m.pt"
    model.write_bytes(b"x")
    if "embed" in sections:
        sections["embed"]["model"] = sections["embed"]["model"].replace("MODEL", str(model))
    with pytest.raises(RecipeError) as err:
        _recipe(tmp_path, 18000, **sections)
    assert message in str(err.value)


@pytest.fixture(scope="module")
def local_build(tmp_path_factory):
    root = tmp_path_factory.mktemp("embed-local")
    model = tiny_cnclip_checkpoint(root / "tiny.pt")
    port = free_port()
    sections = {"embed": {"model": str(model), "batch_size": 4, "device": "cpu"}}
    build(_recipe(root, port, **sections), show_funnel=False)
    return root, port, sections


def _parts(root):
    return {p.name: pl.read_parquet(p) for p in sorted((root / "out" / "work" / "embed").glob("*.parquet"))}


@pytest.mark.slow
def test_a_rerun_reuses_every_part_and_a_new_model_redoes_them(local_build):
    root, port, sections = local_build
    parts = sorted((root / "out" / "work" / "embed").glob("*.parquet"))
    assert len(parts) >= 2  # one per download part
    times = [p.stat().st_mtime_ns for p in parts]
    build(_recipe(root, port, **sections), show_funnel=False)
    assert [p.stat().st_mtime_ns for p in parts] == times
    # The checkpoint retrained (other weights, same path): the fingerprint covers the model file.
    before = _parts(root)
    tiny_cnclip_checkpoint(root / "tiny.pt", seed=3)
    build(_recipe(root, port, **sections), show_funnel=False)
    after = _parts(root)
    assert after.keys() == before.keys()
    filled = [name for name in after if after[name].height]  # a part whose rows dedup all dropped has none
    assert filled and [after[name]["uid"].to_list() for name in filled] == [before[name]["uid"].to_list()
                                                                           for name in filled]
    assert all(not after[name]["image_embedding"].equals(before[name]["image_embedding"]) for name in filled)


@pytest.mark.slow
@pytest.mark.spark
def test_the_spark_engine_writes_the_same_embedding_parts(local_build, tmp_path, spark):
    root, port, sections = local_build
    recipe = _recipe(tmp_path, port, **sections)
    # The stages before embed on the local engine (they have Spark tests of their own), then the
    # build on Spark: the up-to-date stages are skipped, embed and shard run on the executors.
    run_text(recipe), run_download(recipe), run_dedup(recipe)
    assert not (tmp_path / "out" / "work" / "embed").exists()
    build(recipe, show_funnel=False, spark=spark)
    local, on_spark = _parts(root), _parts(tmp_path)
    assert local.keys() == on_spark.keys() and local
    for name in local:
        ours, theirs = local[name], on_spark[name]
        assert theirs["uid"].to_list() == ours["uid"].to_list(), name
        # The same model on the same pixels: equal up to the float16 rounding of the last bit
        # (Spark's Python workers run torch with their own thread count, which orders sums differently).
        for column in ("image_embedding", "text_embedding"):
            assert np.abs(theirs[column].to_numpy().astype(np.float32)
                          - ours[column].to_numpy().astype(np.float32)).max(initial=0) < 1e-3, (name, column)
        assert np.allclose(theirs["clip_score"].to_numpy(), ours["clip_score"].to_numpy(), atol=1e-5), name


from spark_session import spark  # noqa: E402,F401 (the session fixture)


@pytest.mark.parametrize("rule, dropped", [
    ({"min_score": 0.26}, [2, 4, 6]),  # 0.26 itself is kept; a null score (no embedding) is not
    ({"keep_fraction": 0.25}, [2, 3, 4, 6, 7]),  # the top 2 of 7 by score; of the tie at 0.3 the lower uid
])
def test_the_clip_score_filter_rules(tmp_path, rule, dropped):
    _filter_rules(tmp_path, rule, dropped, None)


@pytest.mark.spark
@pytest.mark.parametrize("rule, dropped", [({"min_score": 0.26}, [2, 4, 6]), ({"keep_fraction": 0.25}, [2, 3, 4, 6, 7])])
def test_the_clip_score_filter_rules_on_spark(tmp_path, rule, dropped, spark):
    _filter_rules(tmp_path, rule, dropped, spark)


def _filter_rules(tmp_path, rule, dropped, spark):
    from types import SimpleNamespace

    from cnclip.corpus.recipe.embed import ClipScoreFilter
    from cnclip.corpus.runtime.engine import LocalEngine
    from cnclip.corpus.runtime.layout import BuildLayout
    from cnclip.corpus.stages.embed import decide

    layout = BuildLayout(tmp_path / "out", tmp_path / "manifests")
    (tmp_path / "out" / "work" / "embed-scores").mkdir(parents=True)
    pl.DataFrame({"uid": [1, 2, 3, 4, 5, 6, 7], "clip_score": [0.3, 0.1, 0.3, None, 0.9, 0.2599, 0.26]},
                 schema={"uid": pl.Int64, "clip_score": pl.Float32}).write_parquet(
        layout.embed_scores_dir / "00000.parquet")
    recipe = SimpleNamespace(filter=SimpleNamespace(clip_score=ClipScoreFilter(**rule)),
                             dedup=SimpleNamespace(semantic=None))
    if spark is None:
        engine = LocalEngine(1)
    else:
        from cnclip.corpus.runtime.spark_engine import SparkEngine

        engine = SparkEngine(spark)
    assert decide(recipe, engine, layout) == {"embed:low_clip_score": len(dropped)}
    decisions = pl.read_parquet(layout.embed_decisions).sort("uid")
    assert decisions["uid"].to_list() == dropped
    detail = dict(zip(decisions["uid"].to_list(), decisions["detail"].to_list(), strict=True))
    if "min_score" in rule:
        assert detail[2] == "clip_score 0.1 < 0.26" and detail[6] == "clip_score 0.2599 < 0.26"
    else:
        assert detail[3] == "clip_score 0.3 outside the top 0.25 (rank 3 of 7)"
        assert detail[4] == "clip_score missing outside the top 0.25 (rank 7 of 7)"
