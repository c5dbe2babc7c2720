"""A build writes only into folders it owns, removes only what it made, and runs alone."""

import json
import os
import subprocess
import sys
import textwrap

import polars as pl
import pytest
from typer.testing import CliRunner

from cnclip.corpus import build, clean, run_text
from cnclip.corpus.recipe import RecipeError, parse_recipe
from cnclip.corpus.runtime.ownership import BuildLockedError, OwnershipError

runner = CliRunner()


def listing(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.fixture
def text_recipe(tmp_path, make_recipe):
    """A recipe whose ingest + text stages run offline in a second (no download)."""
    pl.DataFrame({"url": ["http://127.0.0.1:9/a.jpg", "http://127.0.0.1:9/b.jpg"],
                  "caption": ["一只猫在沙发上睡觉", "cat"]}).write_parquet(tmp_path / "list.parquet")
    return make_recipe([{"name": "m", "kind": "metadata", "path": str(tmp_path / "list.parquet")}])


@pytest.mark.parametrize("output, manifests, inside", [
    ("out", "out/work/manifests", "out/work"),
    ("out", "out/shards", "out/shards"),
    ("out", "out/sample_web/m", "out/sample_web"),
    ("man/samples", "man", "man/samples"),
    ("man/rejected/x", "man", "man/rejected"),
])
def test_folders_that_would_delete_each_other_are_refused_at_load(tmp_path, output, manifests, inside):
    data = {"name": "t", "output_dir": str(tmp_path / output), "manifest_dir": str(tmp_path / manifests),
            "sources": [{"name": "m", "kind": "metadata", "path": "x.parquet"}]}
    with pytest.raises(RecipeError) as err:
        parse_recipe(data, "r.yaml")
    name = "manifest_dir" if inside.startswith("out") else "output_dir"
    inner = tmp_path / (manifests if name == "manifest_dir" else output)
    assert str(err.value).startswith(f"r.yaml: manifest_dir: Value error, {name} ({inner}) is inside "
                                     f"{tmp_path / inside}, which the build empties and rewrites (got ")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("output, manifests", [("out", "out/manifests"), ("d", "d"), ("d/out", "d")])
def test_nested_or_shared_folders_that_do_not_collide_load(tmp_path, output, manifests):
    recipe = parse_recipe({"name": "t", "output_dir": str(tmp_path / output),
                           "manifest_dir": str(tmp_path / manifests),
                           "sources": [{"name": "m", "kind": "metadata", "path": "x.parquet"}]},
                          check_paths=False)
    assert recipe.manifest_dir == tmp_path / manifests


@pytest.mark.parametrize("folder", ["out", "manifests"])
def test_first_build_into_a_folder_holding_user_files_writes_nothing(tmp_path, text_recipe, folder):
    user = tmp_path / folder
    (user / "samples").mkdir(parents=True)
    (user / "samples" / "mine.parquet").write_bytes(b"the user's own file")
    before = listing(tmp_path)
    with pytest.raises(OwnershipError) as err:
        build(text_recipe, show_funnel=False)
    assert str(err.value) == (f"{user}: already holds files this build did not write (samples); "
                              "choose an empty or new folder")
    assert listing(tmp_path) == before
    assert (user / "samples" / "mine.parquet").read_bytes() == b"the user's own file"


def test_the_cli_refuses_a_used_folder_in_one_line(tmp_path, text_recipe):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps({"name": "test", "output_dir": str(tmp_path / "out"),
                                  "manifest_dir": str(tmp_path / "manifests"),
                                  "sources": [{"name": "m", "kind": "metadata",
                                               "path": str(tmp_path / "list.parquet")}]}))
    result = subprocess.run([sys.executable, "-m", "cnclip.cli", "corpus", "text", str(recipe)],
                            capture_output=True, text=True)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == [f"error: {tmp_path / 'out'}: already holds files this build did not write (notes.txt); "
                     "choose an empty or new folder"]
    assert not (tmp_path / "manifests").exists() and listing(tmp_path / "out") == ["notes.txt"]


def test_another_recipes_build_is_refused(tmp_path, text_recipe, make_recipe):
    run_text(text_recipe)
    other = make_recipe(text_recipe.model_dump(mode="json")["sources"], name="other")
    with pytest.raises(OwnershipError) as err:
        run_text(other)
    assert str(err.value) == (f"{tmp_path / 'out'}: holds the build of recipe 'test', not 'other'; "
                              "give this recipe its own output_dir and manifest_dir")
    with pytest.raises(OwnershipError):
        clean(other)
    assert (tmp_path / "out" / "work" / "text").is_dir()


def test_clean_removes_only_what_the_marker_records(tmp_path, text_recipe):
    run_text(text_recipe)
    out = tmp_path / "out"
    marker = json.loads((out / ".cnclip-build.json").read_text())
    assert marker == {"tool": "cnclip", "recipe": "test", "owns": ["work", "shards", "sample_web"]}
    # Files of the user's beside the build, and a hand-edited marker reaching outside.
    (out / "notes.txt").write_text("mine")
    (tmp_path / "keep").mkdir()
    (tmp_path / "keep" / "data.txt").write_text("mine")
    marker["owns"] += ["../keep", "..", "notes.txt/.."]
    (out / ".cnclip-build.json").write_text(json.dumps(marker))
    clean(text_recipe)
    assert listing(out) == [".cnclip-build.lock", "notes.txt"]  # the (released, empty) lock stays
    assert (tmp_path / "keep" / "data.txt").read_text() == "mine"
    assert not (tmp_path / "manifests").exists()
    clean(text_recipe)  # nothing of ours left: a no-op, even with the user's file there
    assert listing(out) == [".cnclip-build.lock", "notes.txt"]


HOLD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from cnclip.corpus.runtime.ownership import build_lock
    with build_lock(Path(sys.argv[1])):
        print("holding", flush=True)
        time.sleep(120)
""")


def test_a_second_build_meets_the_lock_and_a_dead_holders_lock_is_taken_over(tmp_path, text_recipe):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path / "out")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "holding\n"
        with pytest.raises(BuildLockedError) as err:
            build(text_recipe, show_funnel=False)
        assert str(err.value) == (f"{tmp_path / 'out'}: another build (PID {holder.pid}) is running on this "
                                  "output_dir; wait for it to end")
        assert not (tmp_path / "out" / "work").exists() and not (tmp_path / "manifests").exists()
    finally:
        holder.kill()  # as kill -9 does: the kernel drops its flock
        holder.wait()
    assert (tmp_path / "out" / ".cnclip-build.lock").read_text() == f"{holder.pid}\n"
    assert run_text(text_recipe)["accepted"] == 1
    assert (tmp_path / "out" / ".cnclip-build.lock").read_text() == ""  # released on exit


def test_the_lock_is_reentrant_but_exclusive_within_one_process(tmp_path):
    from cnclip.corpus.runtime.ownership import build_lock

    with build_lock(tmp_path):
        with build_lock(tmp_path):  # build() holds it around the stage calls that take it again
            pass
        fd = os.open(tmp_path / ".cnclip-build.lock", os.O_RDWR)
        import fcntl

        with pytest.raises(BlockingIOError):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.close(fd)
        assert (tmp_path / ".cnclip-build.lock").read_text() == f"{os.getpid()}\n"


def test_a_manifest_dir_nested_in_output_dir_is_not_a_foreign_file(tmp_path, make_recipe, text_recipe):
    recipe = make_recipe(text_recipe.model_dump(mode="json")["sources"],
                         manifest_dir=str(tmp_path / "out" / "manifests"))
    (tmp_path / "out" / "manifests").mkdir(parents=True)
    run_text(recipe)
    assert json.loads((tmp_path / "out" / "manifests" / ".cnclip-build.json").read_text())["owns"] == [
        "samples", "rejected", "funnel.json", "checksums.json"]
    (tmp_path / "out" / "manifests" / "mine.txt").write_text("mine")
    clean(recipe)
    assert listing(tmp_path / "out") == [".cnclip-build.lock", "manifests", "manifests/mine.txt"]
