"""What a training run shows and records beside its checkpoints: progress bars on a terminal, plain
lines elsewhere, TensorBoard scalars on one x-axis across both stages, the package versions."""

import importlib.metadata
import io
import json
import os
import subprocess
import sys

import pytest
from rich.console import Console

from cnclip.train.loop import train
from cnclip.train.progress import TrainProgress
from cnclip.train.runlog import read_log
from test_train_support import shape_shards, tiny_config, write_config  # noqa: F401


def tensorboard_scalars(folder) -> dict[str, list[int]]:
    """Every scalar tag in the run's event files -> its steps, as TensorBoard reads them."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [e.step for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_eval_scalars_share_the_train_x_axis_across_both_stages(tmp_path, shape_shards):
    cfg = tiny_config(tmp_path, shape_shards[:3], batch_size=8, log_every=2, tensorboard=True,
                      eval={"every": 2, "sets": [{"name": "val", "data": shape_shards[3], "max_samples": 16}]},
                      stage1={"steps": 4}, stage2={"steps": 4})
    train(cfg)
    scalars = tensorboard_scalars(tmp_path / "run" / "tensorboard")
    train_steps, eval_steps = scalars["train/loss"], scalars["eval/val/mean_recall"]
    # Train scalars are plotted over samples seen (8 per step), stage 2 continuing stage 1.
    assert train_steps == [16, 32, 48, 64]
    # Evaluations: before training, at stage 1's steps 2 and 4, then stage 2's 2 and 4 — where the
    # train curve is at those moments, not at a step count that restarts at stage 2.
    assert eval_steps == [0, 16, 32, 48, 64]
    evals = read_log(tmp_path / "run", "eval")
    assert [(r["stage"], r["step"]) for r in evals] == [(1, 0), (1, 2), (1, 4), (2, 2), (2, 4)]
    assert set(scalars) >= {"train/lr", "train/logit_scale", "train/samples_per_s", "eval/val/images"}


def test_run_json_records_the_package_versions_and_a_rerun_still_resumes(tmp_path, shape_shards):
    cfg = tiny_config(tmp_path, shape_shards, batch_size=8, stage1={"steps": 3}, stage2={"steps": 2})
    train(cfg, stop_after=2)
    record = json.loads((tmp_path / "run" / "run.json").read_text(encoding="utf-8"))
    versions = record["versions"]
    assert versions["python"].count(".") == 2
    for name in ("cnclip", "torch", "open_clip_torch", "transformers", "polars", "img2dataset", "webdataset"):
        assert versions[name] == importlib.metadata.version(name), name
    assert record["format"] == "cnclip-run-1" and set(record) == {"format", "fingerprint", "config", "versions"}
    # Upgraded packages are not another config: the rerun resumes, and the record keeps the
    # versions the run started with.
    record["versions"] = {**versions, "torch": "0.0.1"}
    (tmp_path / "run" / "run.json").write_text(json.dumps(record), encoding="utf-8")
    summary = train(cfg)
    assert summary["stages"][1]["start_step"] == 2 and summary["stages"][2]["end_step"] == 2
    assert json.loads((tmp_path / "run" / "run.json").read_text(encoding="utf-8"))["versions"]["torch"] == "0.0.1"


def drive(progress: TrainProgress) -> None:
    """A stage of 10 steps resumed at step 4, one evaluation of 6 images, one log line."""
    progress.stage(1, 4, 10)
    for step in range(5, 11):
        progress.step(step)
    with progress.evaluating("val", 6) as advance:
        advance(4)
        advance(2)
    progress.line("stage 1 step 10: loss 1.0000")
    progress.step(10, 1.0)
    progress.close()


def test_a_terminal_gets_bars_with_step_total_and_eta(monkeypatch):
    monkeypatch.delenv("CNCLIP_QUIET", raising=False)
    screen = io.StringIO()
    progress = TrainProgress(console=Console(file=screen, force_terminal=True, width=120))
    assert progress.live
    drive(progress)
    shown = screen.getvalue()
    assert "stage 1" in shown and "10/10" in shown and "ETA" in shown and "loss 1.0000" in shown
    assert "stage 1 step 10: loss 1.0000" in shown  # the log line, printed above the bar


@pytest.mark.parametrize("quiet", ["", "1"])
def test_no_terminal_gets_plain_lines_and_quiet_gets_nothing(monkeypatch, capsys, quiet):
    monkeypatch.setenv("CNCLIP_QUIET", quiet)
    screen = io.StringIO()
    progress = TrainProgress(console=Console(file=screen, force_terminal=False, width=120))
    assert not progress.live
    drive(progress)
    assert screen.getvalue() == ""  # no bar drawn into a file
    assert capsys.readouterr().out == ("" if quiet else "stage 1 step 10: loss 1.0000\n")


def test_only_the_logging_process_shows_anything(monkeypatch, capsys):
    monkeypatch.delenv("CNCLIP_QUIET", raising=False)
    screen = io.StringIO()
    progress = TrainProgress(enabled=False, console=Console(file=screen, force_terminal=True))
    assert not progress.live
    drive(progress)
    assert screen.getvalue() == "" and capsys.readouterr().out == ""


def cli(*args: str, cwd) -> subprocess.CompletedProcess:
    """`cnclip ...` in a fresh interpreter: the terminal is its real stdout and stderr."""
    return subprocess.run([sys.executable, "-m", "cnclip.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300, env={**os.environ, "CNCLIP_QUIET": "1"})


@pytest.mark.slow
def test_library_chatter_goes_to_the_run_log_and_is_gone_after_a_checkpoint_load(tmp_path, shape_shards, caplog):
    config = write_config(tmp_path, shape_shards[:3], batch_size=8, stage1={"steps": 3}, stage2={"steps": 1})
    run = tmp_path / "run"
    first = cli("train", config, "--stop-after", "2", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert first.stderr == ""  # open_clip's warning is not on the terminal...
    logged = (run / "libraries.log").read_text(encoding="utf-8").splitlines()
    assert len(logged) == 1 and "WARNING root: No pretrained weights loaded for model" in logged[0]  # ...but here
    # Resuming loads a checkpoint into the new model: "initialized randomly" would be false.
    resumed = cli("train", config, cwd=tmp_path)
    assert resumed.returncode == 0 and resumed.stderr == ""
    assert "training summary" in resumed.stdout
    assert (run / "libraries.log").read_text(encoding="utf-8").splitlines() == logged
    checkpoint = str(run / "checkpoints" / "stage2-final.pt")
    evaluated = cli("eval", checkpoint, "--data", shape_shards[3], "--max-samples", "8", cwd=tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr
    assert evaluated.stderr == "" and '"mean_recall"' in evaluated.stdout
    from cnclip.train.export import export_checkpoint  # the same model rebuild, here in this process

    export_checkpoint(checkpoint, tmp_path / "exported")
    assert (tmp_path / "exported" / "open_clip_model.safetensors").is_file()
    assert not [r for r in caplog.records if "initialized randomly" in r.getMessage()]
