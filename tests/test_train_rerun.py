"""`cnclip train CONFIG` reruns like a build: the same config resumes or is finished; another one is
refused unless --fresh, which removes only what a run wrote."""

import hashlib
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cnclip.cli import app
from cnclip.train.loop import train
from cnclip.train.rundir import RunDirError, RunPlan, apply_plan, plan_run
from cnclip.train.runlog import read_log
from test_train_support import shape_shards, tiny_config, write_config  # noqa: F401

runner = CliRunner()
SMALL = dict(batch_size=8, stage1={"steps": 2}, stage2={"steps": 2})


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under folder: its bytes and modification time."""
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def steps(run: Path) -> list[tuple[int, int]]:
    return [(r["stage"], r["step"]) for r in read_log(run, "train")]


@pytest.fixture
def finished_run(tmp_path, shape_shards):
    config = write_config(tmp_path, shape_shards, **SMALL)
    result = runner.invoke(app, ["train", config])
    assert result.exit_code == 0, result.output
    return config, tmp_path / "run"


def test_rerunning_a_finished_run_changes_nothing(finished_run):
    config, run = finished_run
    record = json.loads((run / "run.json").read_text())
    assert record["config"]["stage2"]["steps"] == 2 and len(record["fingerprint"]) == 20
    before = snapshot(run)
    assert {"checkpoints/stage1-final.pt", "checkpoints/stage2-final.pt", "log.jsonl"} <= set(before)
    for argv in (["train", config], ["train", config, "--stage", "1"]):
        result = runner.invoke(app, argv)
        assert result.exit_code == 0, result.output
        assert "this config's run is finished" in result.output and "stage2-final.pt" in result.output
    assert snapshot(run) == before  # nothing rewritten, not even touched


def test_another_config_is_refused_then_replaced_with_fresh(finished_run, shape_shards):
    config, run = finished_run
    folder = run.parent
    (run / "notes.txt").write_text("my notes\n")  # the user's files in the run folder
    (run / "checkpoints" / "mine.pt.bak").write_text("a copy I made\n")
    before = snapshot(run)
    other = write_config(folder, shape_shards, **{**SMALL, "stage1": {"steps": 3}})
    result = runner.invoke(app, ["train", other])
    assert result.exit_code == 2
    assert result.output.strip() == (f"error: output_dir: {run} holds a run of another config (changed: "
                                     "stage1.steps); --fresh replaces that run, or choose another output_dir")
    assert snapshot(run) == before

    result = runner.invoke(app, ["train", other, "--fresh", "--stage", "1"])
    assert result.exit_code == 0, result.output
    assert not (run / "checkpoints" / "stage2-final.pt").exists()  # the old run's stage 2: not left stale
    assert steps(run) == [(1, 1), (1, 2), (1, 3)]
    assert (run / "notes.txt").read_text() == "my notes\n"
    assert (run / "checkpoints" / "mine.pt.bak").read_text() == "a copy I made\n"
    assert json.loads((run / "run.json").read_text())["config"]["stage1"]["steps"] == 3
    # The replaced run is now this config's: a plain rerun continues it with stage 2.
    result = runner.invoke(app, ["train", other])
    assert result.exit_code == 0, result.output
    assert steps(run) == [(1, 1), (1, 2), (1, 3), (2, 1), (2, 2)]


def test_an_interrupted_run_resumes_on_a_plain_rerun(tmp_path, shape_shards):
    config = write_config(tmp_path, shape_shards, **{**SMALL, "stage1": {"steps": 4}})
    run = tmp_path / "run"
    assert runner.invoke(app, ["train", config, "--stop-after", "3"]).exit_code == 0
    first_lines = (run / "log.jsonl").read_text().splitlines()
    assert steps(run) == [(1, 1), (1, 2), (1, 3)]
    result = runner.invoke(app, ["train", config])
    assert result.exit_code == 0, result.output
    assert steps(run) == [(1, 1), (1, 2), (1, 3), (1, 4), (2, 1), (2, 2)]
    kept = (run / "log.jsonl").read_text().splitlines()
    assert kept[:3] == first_lines[:3]  # the lines before the stop are the old run's (their times too)
    assert "3→4" in result.output  # stage 1 went on from step 3


def test_run_files_without_a_record_are_not_taken_over(tmp_path, shape_shards):
    cfg = tiny_config(tmp_path, shape_shards)
    run = Path(cfg.output_dir)
    (run / "checkpoints").mkdir(parents=True)
    (run / "log.jsonl").write_text('{"event": "train"}\n')  # e.g. a run of an older cnclip
    with pytest.raises(RunDirError, match=r"holds run files \(log.jsonl, ...\) but no run.json; --fresh"):
        plan_run(cfg, [1, 2])
    plan = plan_run(cfg, [1, 2], fresh=True)
    assert plan.remove == (run / "log.jsonl",) and plan.write_record
    with pytest.raises(RunDirError, match="--fresh removes .* so it cannot resume from it"):
        plan_run(cfg, [1, 2], resume="latest", fresh=True)
    (run / "run.json").write_text("{not json")
    with pytest.raises(RunDirError, match=r"another config \(changed: unreadable run.json\)"):
        plan_run(cfg, [1, 2])


def test_the_python_api_reruns_like_the_cli(finished_run):
    from cnclip.train.config import load_config

    config, run = finished_run
    before = snapshot(run)
    summary = train(load_config(config))
    assert summary["finished"] == str(run / "checkpoints" / "stage2-final.pt") and summary["stages"] == {}
    assert snapshot(run) == before


def as_an_older_version_wrote_it(run: Path, *missing: str) -> None:
    """Rewrite run.json as a cnclip without the fields `missing` (dotted paths, `[i]` for a list
    item) would have: those keys absent, the fingerprint that of the config without them."""
    record = json.loads((run / "run.json").read_text())
    for path in missing:
        *parents, last = path.replace("[", ".").replace("]", "").split(".")
        node = record["config"]
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        del node[last]
    config = json.dumps(record["config"], sort_keys=True).encode()
    record["fingerprint"] = hashlib.sha256(config).hexdigest()[:20]
    (run / "run.json").write_text(json.dumps(record))


NEWER_FIELDS = ("eval.resize", "eval.sets[0].split", "eval.sets[0].kind", "eval.sets[0].resize", "quick_gelu")


def test_a_field_newer_than_the_record_at_its_default_is_the_same_config(tmp_path, shape_shards):
    evals = {"sets": [{"name": "held-out", "data": shape_shards}]}
    cfg = tiny_config(tmp_path, shape_shards, eval=evals)
    run = Path(cfg.output_dir)
    apply_plan(cfg, RunPlan(None, write_record=True))
    as_an_older_version_wrote_it(run, *NEWER_FIELDS)
    stored = (run / "run.json").read_text()
    assert "resize" not in stored and '"split"' not in stored
    assert plan_run(cfg, [1, 2]) == RunPlan(None)  # accepted: this config's run, its record kept
    assert (run / "run.json").read_text() == stored

    def refusal(changed: str) -> str:
        return (f"output_dir: {run} holds a run of another config (changed: {changed}); --fresh replaces "
                "that run, or choose another output_dir")

    changes = [
        (dict(eval={**evals, "resize": "squash"}), "eval.resize"),  # a newer field, not at its default
        (dict(eval={"sets": [{**evals["sets"][0], "split": "val"}]}), "eval.sets[0].split"),
        (dict(eval=evals, stage1={"steps": 7}), "stage1.steps"),  # a field the record has
    ]
    for overrides, changed in changes:
        with pytest.raises(RunDirError) as err:
            plan_run(tiny_config(tmp_path, shape_shards, **overrides), [1, 2])
        assert str(err.value) == refusal(changed)


def test_a_finished_run_recorded_before_newer_fields_stays_finished(finished_run):
    config, run = finished_run
    as_an_older_version_wrote_it(run, "eval.resize", "quick_gelu", "data.exact_resume")
    before = snapshot(run)
    result = runner.invoke(app, ["train", config])
    assert result.exit_code == 0, result.output
    assert "this config's run is finished" in result.output
    assert snapshot(run) == before
    # The same old record against a config that does set one of those fields otherwise: refused.
    yaml_text = Path(config).read_text().replace("exact_resume: true", "exact_resume: false")
    Path(config).write_text(yaml_text)
    result = runner.invoke(app, ["train", config])
    assert result.exit_code == 2 and "(changed: data.exact_resume)" in result.output, result.output
    assert snapshot(run) == before
