"""Resume state (state.py) and the stage fingerprints (pipeline.stage_states), unit-level.

A rerun must redo exactly the stages whose settings or inputs changed, keep what a crash left
whole, and never take a half-written part for a whole one.
"""

import json
import os

import polars as pl
import pytest

import cnclip._common.atomic as atomic_module
from cnclip._common.atomic import remove_temporaries, temporary_name
from cnclip.corpus.pipeline import STAGE_NAMES as STAGES
from cnclip.corpus.pipeline import stage_states
from cnclip.corpus.runtime.layout import BuildLayout
from cnclip.corpus.runtime.state import StageState, fingerprint, write_parquet_atomic


def test_fingerprint_is_a_short_stable_digest_of_its_parts():
    value = fingerprint("text", {"b": 1, "a": [1, 2]})
    assert len(value) == 20 and int(value, 16) >= 0
    assert value == fingerprint("text", {"a": [1, 2], "b": 1})  # key order is not a change
    assert value != fingerprint("text", {"a": [2, 1], "b": 1})
    assert value != fingerprint("text", {"a": [1, 2], "b": 1}, None)
    assert fingerprint("a", "b") != fingerprint("ab")


def test_fingerprint_reads_paths_as_their_text(tmp_path):
    assert fingerprint(tmp_path / "x") == fingerprint(str(tmp_path / "x"))


@pytest.fixture
def stage(tmp_path):
    out_dir, out_file = tmp_path / "parts", tmp_path / "plan.parquet"
    return StageState(tmp_path / "work", "text", "fp-1", (out_dir, out_file))


def record(stage):
    return json.loads(stage.record.read_text(encoding="utf-8"))


def make_outputs(stage):
    folder, file = stage.outputs
    folder.mkdir()
    (folder / "00000.parquet").write_bytes(b"part")
    file.write_bytes(b"plan")


def test_record_lives_in_work_named_after_the_stage(stage, tmp_path):
    assert stage.record == tmp_path / "work" / "text.state.json"


def test_first_run_clears_outputs_and_records_an_incomplete_stage(stage):
    stage.work_dir.mkdir()
    make_outputs(stage)
    assert stage.begin() is False
    assert not any(p.exists() for p in stage.outputs)
    assert record(stage) == {"stage": "text", "fingerprint": "fp-1", "complete": False}
    assert not stage.complete


def test_begin_with_missing_outputs_still_records(stage):
    assert stage.begin() is False
    assert record(stage)["fingerprint"] == "fp-1"


def test_same_fingerprint_resumes_and_keeps_the_parts(stage):
    stage.begin()
    make_outputs(stage)
    assert stage.begin() is True
    assert (stage.outputs[0] / "00000.parquet").read_bytes() == b"part"
    assert stage.outputs[1].read_bytes() == b"plan"


def test_finish_marks_complete_with_its_summary(stage):
    stage.begin()
    stage.finish({"accepted": 3})
    assert record(stage) == {"stage": "text", "fingerprint": "fp-1", "complete": True, "summary": {"accepted": 3}}
    assert stage.complete
    assert stage.summary == {"accepted": 3}
    stage.finish()
    assert record(stage)["summary"] == {} and stage.summary == {}


def test_other_settings_redo_the_stage_from_scratch(stage):
    stage.begin()
    make_outputs(stage)
    stage.finish({"accepted": 3})
    changed = StageState(stage.work_dir, "text", "fp-2", stage.outputs)
    assert not changed.complete
    assert changed.begin() is False
    assert not any(p.exists() for p in stage.outputs)
    assert record(changed) == {"stage": "text", "fingerprint": "fp-2", "complete": False}
    assert not stage.complete  # the old settings' record is gone too


def test_an_incomplete_or_unreadable_record_is_not_complete(stage):
    stage.work_dir.mkdir()
    stage.record.write_text(json.dumps({"stage": "text", "fingerprint": "fp-1"}), encoding="utf-8")
    assert not stage.complete
    stage.record.write_text('{"stage": "text", "fingerprint": "fp-1", "complete": tr', encoding="utf-8")
    assert not stage.complete
    assert stage.summary == {}
    make_outputs(stage)
    assert stage.begin() is False  # a torn record is no proof the parts match: start over
    assert not stage.outputs[0].exists()


def test_reopen_keeps_parts_and_summary_but_is_incomplete(stage):
    stage.begin()
    make_outputs(stage)
    stage.finish({"n": 1})
    stage.reopen()
    assert record(stage) == {"stage": "text", "fingerprint": "fp-1", "complete": False, "summary": {"n": 1}}
    assert stage.begin() is True
    assert stage.outputs[1].exists()


def test_reopen_without_a_record_writes_nothing(stage):
    stage.reopen()
    assert not stage.record.exists()


def test_discard_forgets_the_stage(stage):
    stage.begin()
    stage.finish()
    make_outputs(stage)
    stage.discard()
    assert not stage.record.exists()
    stage.discard()  # twice is fine
    assert stage.begin() is False and not stage.outputs[1].exists()


def test_temporary_name_is_hidden_beside_the_target(tmp_path):
    path = tmp_path / "part.parquet"
    assert temporary_name(path) == tmp_path / f".part.parquet.tmp{os.getpid()}"


@pytest.mark.parametrize("lazy", [False, True])
def test_write_parquet_atomic_writes_whole_parts(tmp_path, lazy):
    frame = pl.DataFrame({"uid": [1, 2, 3]})
    target = tmp_path / "new" / "dir" / "p.parquet"
    write_parquet_atomic(frame.lazy() if lazy else frame, target)
    assert pl.read_parquet(target).equals(frame)
    assert sorted(p.name for p in target.parent.iterdir()) == ["p.parquet"]


def test_a_crash_before_the_rename_leaves_the_old_part_and_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "p.parquet"
    pl.DataFrame({"uid": [1]}).write_parquet(target)

    def crash(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(atomic_module.os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        write_parquet_atomic(pl.DataFrame({"uid": [7, 8]}), target)
    assert pl.read_parquet(target)["uid"].to_list() == [1]
    assert [p.name for p in tmp_path.iterdir()] == ["p.parquet"]


def test_a_failing_query_leaves_no_part(tmp_path):
    target = tmp_path / "p.parquet"
    broken = pl.LazyFrame({"a": ["x"]}).select(pl.col("a").cast(pl.Int64, strict=True))
    with pytest.raises(pl.exceptions.PolarsError):
        write_parquet_atomic(broken, target)
    assert list(tmp_path.iterdir()) == []


def test_remove_temporaries_removes_only_leftovers_of_writers(tmp_path):
    for name in (".p.parquet.tmp123", ".00001.tar.tmp9", "p.parquet", ".hidden", "x.tmp1"):
        (tmp_path / name).write_bytes(b"x")
    remove_temporaries(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".hidden", "p.parquet", "x.tmp1"]
    remove_temporaries(tmp_path / "absent")  # no folder: nothing to do


# --- fingerprints: what a change of settings or inputs redoes ---------------------------------

@pytest.fixture
def inputs(tmp_path):
    data = tmp_path / "in"
    data.mkdir()
    pl.DataFrame({"url": ["http://127.0.0.1/a.jpg"], "caption": ["一只猫"]}).write_parquet(data / "m-0.parquet")
    (data / "block.txt").write_text("广告\n", encoding="utf-8")
    evals = tmp_path / "evals"
    (evals / "sub").mkdir(parents=True)
    (evals / "a.jpg").write_bytes(b"a" * 10)
    (evals / "sub" / "b.jpg").write_bytes(b"b" * 10)
    (tmp_path / "tars").mkdir()
    (tmp_path / "tars" / "e-0.tar").write_bytes(b"t" * 10)
    return tmp_path


@pytest.fixture
def prints(make_recipe, inputs):
    def make(sources=None, **sections):
        sections.setdefault("text", {})
        sections["text"] = {"blacklist": str(inputs / "in" / "block.txt"), **sections["text"]}
        sections.setdefault("dedup", {})
        sections["dedup"] = {"eval_images": [str(inputs / "evals"), str(inputs / "tars" / "e-*.tar")],
                             **sections["dedup"]}
        sources = sources or [{"name": "m", "kind": "metadata", "path": str(inputs / "in" / "m-*.parquet")}]
        recipe = make_recipe(sources, **sections)
        return {stage: s.fingerprint for stage, s in stage_states(recipe).items()}

    return make


def changed(before, after):
    return [stage for stage in STAGES if before[stage] != after[stage]]


def test_every_stage_has_its_own_fingerprint(prints):
    values = prints()
    assert list(values) == list(STAGES)
    assert len(set(values.values())) == len(STAGES)
    assert prints() == values  # nothing changed, nothing to redo


@pytest.mark.parametrize("section, value, redone", [
    ("text", {"min_chars": 3}, ["text", "download", "hash", "dedup", "shard"]),
    ("image", {"size": 48}, ["download", "hash", "dedup", "shard"]),
    ("download", {"timeout": 7}, ["download", "hash", "dedup", "shard"]),
    ("dedup", {"phash_max_distance": 2}, ["dedup", "shard"]),
    ("shard", {"samples_per_shard": 7}, ["shard"]),
    ("text", {"processes": 2}, []),
    ("shard", {"processes": 2}, []),
])
def test_a_changed_setting_redoes_its_stage_and_the_ones_after(prints, section, value, redone):
    assert changed(prints(), prints(**{section: value})) == redone


def test_a_changed_source_setting_redoes_everything(prints, inputs):
    before = prints()
    after = prints(sources=[{"name": "m", "kind": "metadata", "path": str(inputs / "in" / "m-*.parquet"),
                             "caption_column": "text"}])
    assert changed(before, after) == list(STAGES)


def test_another_manifest_dir_redoes_the_shards(prints, inputs):
    assert changed(prints(), prints(manifest_dir=str(inputs / "elsewhere"))) == ["shard"]


def test_a_rewritten_or_added_input_file_redoes_everything(prints, inputs):
    before = prints()
    part = inputs / "in" / "m-0.parquet"
    stat = part.stat()
    os.utime(part, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    touched = prints()
    assert changed(before, touched) == list(STAGES)
    pl.DataFrame({"url": ["http://127.0.0.1/b.jpg"], "caption": ["一只狗"]}).write_parquet(inputs / "in" / "m-1.parquet")
    assert changed(touched, prints()) == list(STAGES)


def test_a_changed_blacklist_file_redoes_the_text_stage_on(prints, inputs):
    before = prints()
    (inputs / "in" / "block.txt").write_text("广告\n招商\n", encoding="utf-8")
    assert changed(before, prints()) == ["text", "download", "hash", "dedup", "shard"]


def test_no_blacklist_differs_from_a_blacklist(prints):
    assert changed(prints(), prints(text={"blacklist": None})) == ["text", "download", "hash", "dedup", "shard"]


def test_a_changed_eval_image_inside_a_folder_redoes_dedup(prints, inputs):
    before = prints()
    (inputs / "evals" / "sub" / "b.jpg").write_bytes(b"c" * 11)  # in a subfolder: the top folder's stat is unchanged
    after = prints()
    assert changed(before, after) == ["dedup", "shard"]
    (inputs / "evals" / "sub" / "c.jpg").write_bytes(b"c")
    assert changed(after, prints()) == ["dedup", "shard"]


def test_a_changed_eval_tar_of_a_glob_redoes_dedup(prints, inputs):
    before = prints()
    (inputs / "tars" / "e-1.tar").write_bytes(b"t")
    after = prints()
    assert changed(before, after) == ["dedup", "shard"]
    (inputs / "tars" / "e-0.tar").write_bytes(b"u" * 12)
    assert changed(after, prints()) == ["dedup", "shard"]


def test_a_changed_eval_hash_list_redoes_dedup(prints, inputs):
    hashes = inputs / "evals.parquet"
    pl.DataFrame({"id": ["a"], "phash": ["00ff00ff00ff00ff"]}).write_parquet(hashes)
    before = prints(dedup={"eval_images": [str(hashes)]})
    pl.DataFrame({"id": ["a", "b"], "phash": ["00ff00ff00ff00ff", "ff00ff00ff00ff00"]}).write_parquet(hashes)
    assert changed(before, prints(dedup={"eval_images": [str(hashes)]})) == ["dedup", "shard"]


def test_stage_records_and_outputs(make_recipe, tmp_path):
    recipe = make_recipe([{"name": "m", "kind": "metadata", "path": str(tmp_path / "none-*.parquet")}])
    layout = BuildLayout.of(recipe)
    states = stage_states(recipe)
    assert {s: states[s].stage for s in STAGES} == {s: s for s in STAGES}
    assert {s.work_dir for s in states.values()} == {layout.work}
    assert {s: states[s].outputs for s in STAGES} == {
        "ingest": (layout.ingest_dir, layout.work / "crawl"),
        "text": (layout.text_dir,),
        "download": (layout.download_dir, layout.download_input_dir),
        "hash": (layout.hash_dir, layout.work / "hash-members.parquet"),
        "dedup": (layout.dedup_decisions.parent,),
        "shard": (layout.shards_dir, layout.samples_dir, layout.rejected_dir, layout.funnel_path,
                  layout.checksums_path, layout.shard_plan.parent),
    }


def test_a_changed_crawl_setting_redoes_everything(prints):
    assert changed(prints(), prints(crawl={"max_redirects": 1})) == list(STAGES)


def test_a_new_hash_version_redoes_hashes_and_what_follows(prints, monkeypatch):
    from cnclip.corpus.stages import hash as pipeline  # HASH_VERSION lives with the hash stage

    before = prints()
    monkeypatch.setattr(pipeline, "HASH_VERSION", "phash-v2")
    assert changed(before, prints()) == ["hash", "dedup", "shard"]


def test_file_listing_records_size_and_time_and_missing_files(tmp_path):
    from cnclip.corpus.pipeline import _file_listing

    present = tmp_path / "a.txt"
    present.write_bytes(b"12345")
    stat = present.stat()
    missing = str(tmp_path / "gone.txt")
    assert _file_listing([str(present), missing]) == [[str(present), 5, stat.st_mtime_ns], [missing, None, None]]


def test_allowing_local_files_redoes_the_text_stage(prints, inputs):
    """file:// rows are rejected by the text stage unless folders are allowed: allowing (or
    changing the allowed folders back to none) must redo text, not only download."""
    folder = inputs / "photos"
    folder.mkdir()
    before = prints()
    allowed = prints(download={"allow_local_files": [str(folder)]})
    assert changed(before, allowed) == ["text", "download", "hash", "dedup", "shard"]
    other = inputs / "more"
    other.mkdir()
    # Which folders are allowed is the download's business (the guard checks them there).
    assert changed(allowed, prints(download={"allow_local_files": [str(other)]})) == [
        "download", "hash", "dedup", "shard"]
