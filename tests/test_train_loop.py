"""The two-stage loop on CPU with the tiny models: learning, locking, exact resume, accumulation."""

import types
from pathlib import Path

import open_clip
import pytest
import torch

from cnclip.train.checkpoint import find_latest, load_checkpoint
from cnclip.train.data import DataError
from cnclip.train.distributed import Runtime
from cnclip.train.loop import Trainer, train
from cnclip.train.models import create_model
from cnclip.train.runlog import read_log
from test_train_support import dropout_model, shape_samples, shape_shards, tiny_config, write_shards  # noqa: F401


def losses(run_dir: Path) -> list[tuple]:
    return [(r["stage"], r["step"], r["loss"]) for r in read_log(run_dir, "train")]


@pytest.fixture(scope="module")
def two_stage_run(tmp_path_factory, shape_shards):
    """Stage 1 then stage 2, image tower initialised from a checkpoint file, text tower random."""
    root = tmp_path_factory.mktemp("two_stage")
    torch.manual_seed(7)
    source, _ = create_model("cn-tiny", vocab_size=30, workdir=root / "src")
    torch.save({"state_dict": source.state_dict()}, root / "image-init.pt")
    cfg = tiny_config(root, shape_shards, batch_size=32, log_every=1, checkpoint_every=10, keep_checkpoints=10,
                      init={"image": str(root / "image-init.pt")},
                      stage1={"steps": 40, "lr": 3e-3}, stage2={"steps": 40, "lr": 1e-3})
    summary = train(cfg)
    image_init = {k[len("visual."):]: v for k, v in source.state_dict().items() if k.startswith("visual.")}
    return cfg, summary, image_init


def test_loss_decreases(two_stage_run):
    cfg, summary, _ = two_stage_run
    run = [loss for _, _, loss in losses(cfg.output_dir)]
    assert len(run) == 80
    first, last = sum(run[:5]) / 5, sum(run[-5:]) / 5
    assert first == pytest.approx(torch.log(torch.tensor(32.0)).item(), abs=0.3)  # chance: ln(batch)
    assert last < first - 0.8, (first, last)


def test_image_tower_frozen_in_stage_1_and_trained_in_stage_2(two_stage_run):
    cfg, summary, image_init = two_stage_run
    ckpts = Path(cfg.output_dir) / "checkpoints"
    stage1, stage2 = load_checkpoint(ckpts / "stage1-final.pt"), load_checkpoint(ckpts / "stage2-final.pt")
    assert (stage1["stage"], stage1["step"], stage1["stage_complete"]) == (1, 40, True)
    for key, value in image_init.items():
        assert torch.equal(stage1["model"]["visual." + key], value), key  # bit-identical after 40 steps
    changed = [k for k, v in image_init.items() if not torch.equal(stage2["model"]["visual." + k], v)]
    assert len(changed) == len(image_init)  # every image parameter moved in stage 2
    # Stage 1 did train the rest: text tower, projection and temperature moved between steps 10 and 40.
    step10 = load_checkpoint(ckpts / "stage1-step00000010.pt")
    text_keys = [k for k in stage1["model"] if k.startswith("text.") and "position_ids" not in k]
    assert all(not torch.equal(step10["model"][k], stage1["model"][k]) for k in text_keys)
    assert step10["model"]["logit_scale"] != stage1["model"]["logit_scale"]
    assert all(torch.equal(step10["model"][k], stage1["model"][k]) for k in stage1["model"] if k.startswith("visual."))
    assert summary["stages"][1]["trainable"] < summary["stages"][2]["trainable"]
    assert summary["stages"][2]["trainable"] - summary["stages"][1]["trainable"] == sum(
        v.numel() for v in image_init.values())


def test_stage_2_starts_from_any_stage_1_checkpoint(two_stage_run, tmp_path):
    cfg, _, image_init = two_stage_run
    mid = Path(cfg.output_dir) / "checkpoints" / "stage1-step00000030.pt"
    assert mid.is_file()
    other = cfg.model_copy(update={"output_dir": tmp_path / "from-mid", "stage2": cfg.stage2.model_copy(
        update={"steps": 3})})
    summary = train(other, stage="2", resume=mid)
    assert list(summary["stages"]) == [2]
    final = load_checkpoint(tmp_path / "from-mid" / "checkpoints" / "stage2-final.pt")
    assert (final["stage"], final["step"]) == (2, 3)
    assert not torch.equal(final["model"]["visual.conv1.weight"], image_init["conv1.weight"])
    # Its first loss is near the stage-1 checkpoint's, not back at chance.
    assert losses(tmp_path / "from-mid")[-3][2] < 3.2
    with pytest.raises(ValueError, match="stage 2 is complete"):
        train(other, stage="2", resume=tmp_path / "from-mid" / "checkpoints" / "stage2-final.pt")


def test_batchnorm_statistics_frozen_in_stage_1(tmp_path, shape_shards):
    cfg = tiny_config(tmp_path, shape_shards, model="cn-tiny-rn", stage1={"steps": 3}, stage2={"steps": 3})
    torch.manual_seed(0)
    train(cfg, stage="1")
    stage1 = load_checkpoint(Path(cfg.output_dir) / "checkpoints" / "stage1-final.pt")
    torch.manual_seed(0)  # the run seeds with cfg.seed before building: same initial weights
    model, _ = create_model("cn-tiny-rn", vocab_size=len(stage1["vocab"].split()), workdir=tmp_path / "w")
    bn_keys = [k for k in model.state_dict() if "running_mean" in k or "running_var" in k]
    assert bn_keys
    for key in bn_keys:
        assert torch.equal(stage1["model"][key], model.state_dict()[key]), key
    train(cfg, stage="2", resume=Path(cfg.output_dir) / "checkpoints" / "stage1-final.pt")
    stage2 = load_checkpoint(Path(cfg.output_dir) / "checkpoints" / "stage2-final.pt")
    assert all(not torch.equal(stage2["model"][k], stage1["model"][k]) for k in bn_keys if "running_mean" in k)


@pytest.fixture(scope="module")
def resume_setup(tmp_path_factory, shape_shards):
    """Text dropout (training draws from the RNG), log lines every 2 steps, 2 workers; and the
    uninterrupted run every resumed one must match."""
    root = tmp_path_factory.mktemp("resume")
    model = dropout_model(root)

    def config(name, **data):
        return tiny_config(root / name, shape_shards, model=model, log_every=2, checkpoint_every=2,
                           data={"train": shape_shards, "workers": 2, "shuffle_buffer": 20, **data},
                           stage1={"steps": 6}, stage2={"steps": 6})

    train(config("straight"))
    straight = losses(root / "straight" / "run")
    assert len(straight) == 6  # steps 2, 4, 6 of each stage
    return root, config, straight


@pytest.mark.parametrize("stop_after", [3, 9])  # mid-stage 1, mid-stage 2; both mid-log-window
def test_exact_resume(resume_setup, stop_after):
    root, config, straight = resume_setup
    name = f"resumed{stop_after}"
    stopped = train(config(name), stop_after=stop_after)
    assert stopped["stopped"] and len(losses(root / name / "run")) == stop_after // 2
    latest = find_latest(root / name / "run")
    assert latest.name == f"stage{1 if stop_after < 6 else 2}-step{stop_after % 6:08d}.pt"
    train(config(name), resume=latest)
    # Bit-identical losses, in order: the same data, dropout masks and log windows (the line after
    # the resume averages a step from before it).
    assert losses(root / name / "run") == straight

    if stop_after == 3:  # the check can fail: without the data replay the resumed losses differ
        train(config("replay-off", exact_resume=False), stop_after=stop_after)
        train(config("replay-off", exact_resume=False), resume=find_latest(root / "replay-off" / "run"))
        assert losses(root / "replay-off" / "run") != straight


def test_stage_2_from_stage_1_final_matches_the_straight_run(resume_setup):
    """`--stage 1` then `--stage 2 --resume stage1-final.pt` (or `--resume latest`): RNG restored too."""
    root, config, straight = resume_setup
    train(config("split"), stage="1")
    final = root / "split" / "run" / "checkpoints" / "stage1-final.pt"
    assert find_latest(root / "split" / "run") == final
    train(config("split"), stage="2", resume=final)
    assert losses(root / "split" / "run") == straight


def test_resume_with_another_process_count(resume_setup):
    """What rank 1 of 2 processes does with a 1-process checkpoint: a user error with exact resume,
    fresh RNG and data streams without (said in the log)."""
    root, config, _ = resume_setup
    checkpoint = root / "straight" / "run" / "checkpoints" / "stage2-step00000004.pt"

    def trainer(cfg, rank):
        runtime = Runtime("cpu")
        runtime.rank, runtime.world_size = rank, 2  # no process group: gathers return this rank's own
        return Trainer(cfg, runtime)

    with pytest.raises(DataError, match="written by 1 processes, now 2; exact resume needs the same number"):
        trainer(config("ws-exact"), rank=1).run(resume=checkpoint)
    for rank in (1, 0):  # stop_after=0: set up, start the data streams, checkpoint, no step
        summary = trainer(config("ws-fresh", exact_resume=False), rank=rank).run(resume=checkpoint, stop_after=0)
        assert summary["stopped"]
    notes = read_log(root / "ws-fresh" / "run", "resume")
    assert notes and "written by 1 processes, now 2" in notes[-1]["note"]


def test_accumulation_equals_the_large_batch(tmp_path, shape_shards):
    """open_clip's feature-cache accumulation: 2 × 8 gives the losses of one batch of 16."""
    common = dict(data={"train": shape_shards, "workers": 0, "shuffle_buffer": 0, "augment": False},
                  stage1={"steps": 3}, stage2={"steps": 3})
    train(tiny_config(tmp_path / "big", shape_shards, batch_size=16, **common))
    train(tiny_config(tmp_path / "accum", shape_shards, batch_size=8, accum_steps=2, **common))
    big, accum = losses(tmp_path / "big" / "run"), losses(tmp_path / "accum" / "run")
    assert [s[:2] for s in big] == [s[:2] for s in accum]
    for (_, _, a), (_, _, b) in zip(big, accum, strict=True):
        assert a == pytest.approx(b, rel=1e-5)
    # …and differs from plain batches of 8.
    train(tiny_config(tmp_path / "small", shape_shards, batch_size=8, **common))
    assert losses(tmp_path / "small" / "run")[0][2] != pytest.approx(big[0][2], rel=1e-3)


@pytest.mark.parametrize("micro", [[8, 8], [4, 4, 4, 4]])
def test_accumulation_gradients_equal_the_large_batch(tmp_path, micro):
    """Every parameter's gradient, the temperature's included, equals one batch of 16's."""
    torch.manual_seed(0)
    model, _ = create_model("cn-tiny", vocab_size=200, workdir=tmp_path)
    model.train()
    images = torch.randn(16, 3, 64, 64)
    texts = torch.randint(5, 200, (16, 52))
    texts[:, 0], texts[:, 20], texts[:, 21:] = 2, 3, 0
    trainer = types.SimpleNamespace(rt=Runtime("cpu"), loss_fn=open_clip.ClipLoss(),
                                    cfg=types.SimpleNamespace(precision="fp32", max_logit_scale=100.0))

    def gradients(sizes):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        batches = [{"image": images[a:a + n], "text": texts[a:a + n]} for a, n in zip(starts, sizes, strict=True)]
        loss = Trainer._step(trainer, model, model, batches, optimizer, torch.amp.GradScaler("cuda", enabled=False),
                             None)
        loss = float(loss)
        return loss, {name: p.grad.clone() for name, p in model.named_parameters()}

    big_loss, big = gradients([16])
    loss, accumulated = gradients(micro)
    assert loss == pytest.approx(big_loss, rel=1e-5)
    assert set(big) == set(accumulated) and "logit_scale" in big and big["logit_scale"].abs().item() > 1e-4
    for name, grad in big.items():
        torch.testing.assert_close(accumulated[name], grad, rtol=1e-4, atol=1e-7, msg=name)


def test_patience_switches_stage_early(tmp_path, shape_shards):
    cfg = tiny_config(tmp_path, shape_shards, eval={"every": 2, "sets": [{"name": "val", "data": shape_shards[-1],
                                                                         "max_samples": 24}]},
                      stage1={"steps": 50, "lr": 1e-12, "patience": 2}, stage2={"steps": 2})
    summary = train(cfg)
    assert summary["stages"][1]["end_step"] < 50
    switch = read_log(cfg.output_dir, "stage_switch")
    assert switch and switch[0]["reason"] == "patience"
    assert summary["stages"][2]["end_step"] == 2


def test_corrupt_samples_are_skipped_and_counted(tmp_path):
    import webdataset as wds

    samples = shape_samples(24, seed=5)
    bad = tmp_path / "bad" / "00000.tar"
    bad.parent.mkdir()
    with wds.TarWriter(str(bad)) as writer:  # two undecodable images among 24 good samples
        for i, sample in enumerate(samples):
            writer.write({"__key__": f"k{i:03d}", "jpg": sample["jpg"], "txt": sample["txt"]})
            if i in (3, 9):
                writer.write({"__key__": f"k{i:03d}-bad", "jpg": b"not a jpeg", "txt": "一个坏样本"})
    cfg = tiny_config(tmp_path / "a", [str(bad)], batch_size=8, stage1={"steps": 2}, stage2={"steps": 1},
                      data={"train": [str(bad)], "workers": 0, "shuffle_buffer": 0})
    train(cfg)  # 24 good samples read: both bad ones met exactly once
    last = read_log(cfg.output_dir, "train")[-1]
    assert last["bad_samples"] == [2] and last["bad_shards"] == [0]
    errors = [e for r in read_log(cfg.output_dir, "skipped") for e in r["errors"]]
    assert [e.split(":")[0] for e in errors] == ["k003-bad", "k009-bad"]

    # A truncated tar: the stream reports it and goes on with the other shard.
    shards = write_shards(tmp_path / "trunc", shape_samples(40, seed=6), per_shard=20)
    raw = Path(shards[1]).read_bytes()
    Path(shards[1]).write_bytes(raw[: len(raw) // 2 + 100])
    cfg = tiny_config(tmp_path / "b", shards, batch_size=8, stage1={"steps": 8}, stage2={"steps": 1},
                      data={"train": shards, "workers": 0, "shuffle_buffer": 0})
    summary = train(cfg)
    assert summary["stages"][2]["end_step"] == 1
    assert read_log(cfg.output_dir, "train")[-1]["bad_shards"][0] >= 1


def test_resume_counts_bad_shards_once(tmp_path):
    """A truncated shard met before the checkpoint is not counted (or logged) again by the replay."""
    shards = write_shards(tmp_path / "shards", shape_samples(40, seed=6), per_shard=20)
    raw = Path(shards[1]).read_bytes()
    Path(shards[1]).write_bytes(raw[: len(raw) // 2 + 100])

    def config(name):
        return tiny_config(tmp_path / name, shards, batch_size=8, stage1={"steps": 8}, stage2={"steps": 1},
                           data={"train": shards, "workers": 0, "shuffle_buffer": 0})

    def counts(name):
        records = read_log(tmp_path / name / "run")
        return ([(r["stage"], r["step"], r["bad_shards"]) for r in records if r["event"] == "train"],
                [r["errors"] for r in records if r["event"] == "skipped"])

    train(config("straight"))
    train(config("resumed"), stop_after=5)
    assert counts("resumed")[0][-1][2] == [1]  # the broken shard was met before the stop
    train(config("resumed"), resume=find_latest(tmp_path / "resumed" / "run"))
    straight = counts("straight")
    assert straight[0][-1][2][0] >= 2  # met in more than one epoch: some before the stop, some after
    assert counts("resumed") == straight


def test_stream_reports_each_error_once_and_caps_the_messages(tmp_path):
    import webdataset as wds

    from cnclip.train.data import ShardStream

    good = shape_samples(16, seed=2)
    path = tmp_path / "00000.tar"
    with wds.TarWriter(str(path)) as writer:  # 30 undecodable samples, then 16 good ones
        for i in range(30):
            writer.write({"__key__": f"bad{i:03d}", "jpg": b"not a jpeg", "txt": "坏"})
        for i, sample in enumerate(good):
            writer.write({"__key__": f"ok{i:03d}", "jpg": sample["jpg"], "txt": sample["txt"]})
    stream = ShardStream([str(path)], batch_size=4, transform=lambda image: torch.zeros(3, 8, 8),
                         tokenizer=lambda captions: torch.zeros(len(captions), 4, dtype=torch.long), seed=0,
                         shuffle_buffer=0)
    batches = iter(stream)
    first, second = next(batches), next(batches)
    assert first["bad_samples"] == 30 and len(first["errors"]) == 20  # the first 20 messages (per worker)
    assert first["errors"][0].startswith("bad000:")
    assert second["bad_samples"] == 0 and second["errors"] == []  # only what is new since the last batch


def test_latest_marker_is_fsynced_with_its_directory(tmp_path, monkeypatch):
    import os
    import stat

    from cnclip.train.checkpoint import write_latest

    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(stat.S_ISDIR(os.fstat(fd).st_mode)), real_fsync(fd)))
    write_latest(tmp_path, tmp_path / "stage1-final.pt")
    assert (tmp_path / "latest.txt").read_text() == "stage1-final.pt\n"
    assert False in synced and True in synced  # the file's bytes, then the directory holding the rename
    assert synced.index(True) > synced.index(False)


def test_losses_are_reduced_only_for_log_lines(tmp_path, shape_shards, monkeypatch):
    """No per-step all_reduce/.item() sync: the window keeps detached tensors until a line is written."""
    calls = []
    real = Runtime.means
    monkeypatch.setattr(Runtime, "means", lambda self, values: (calls.append(len(values)), real(self, values))[1])
    cfg = tiny_config(tmp_path, shape_shards, log_every=2, stage1={"steps": 3}, stage2={"steps": 3})
    summary = train(cfg)
    assert calls == [2, 1, 2, 1]  # steps 2 and 3 (the stage end) of each stage
    assert [len(summary["stages"][n]["losses"]) for n in (1, 2)] == [3, 3]
    assert [r["step"] for r in read_log(cfg.output_dir, "train")] == [2, 3, 2, 3]


@pytest.mark.parametrize("resampled", [False, True])
def test_a_worker_whose_shards_are_all_unreadable_fails_instead_of_hanging(tmp_path, resampled):
    from cnclip.train.data import ShardStream

    shards = write_shards(tmp_path, shape_samples(8, seed=2), per_shard=8)
    (tmp_path / "empty.tar").write_bytes(b"")  # e.g. a copy that crashed half-way
    stream = ShardStream([str(tmp_path / "empty.tar")],
                         batch_size=4, transform=lambda image: torch.zeros(3, 8, 8),
                         tokenizer=lambda captions: torch.zeros(len(captions), 4), seed=0, workers=1,
                         shuffle_buffer=0, resampled=resampled)
    with pytest.raises(DataError, match="no sample|gave a sample"):
        next(iter(stream))
    readable = ShardStream(shards, batch_size=4, transform=lambda image: torch.zeros(3, 8, 8),
                           tokenizer=lambda captions: torch.zeros(len(captions), 4), seed=0, workers=1,
                           shuffle_buffer=0, resampled=resampled)
    assert next(iter(readable))["image"].shape == (4, 3, 8, 8)


def test_a_one_sample_shard_read_twice_in_a_row_gives_two_whole_samples(tmp_path):
    """An epoch boundary or a resampled draw can read the same one-sample tar twice running: each
    read is its own sample, not one sample with every member twice."""
    from cnclip.train.data import tarfile_samples

    (shard,) = write_shards(tmp_path, shape_samples(1, seed=5), per_shard=1)
    errors = []
    samples = list(tarfile_samples([{"url": shard}, {"url": shard}], handler=lambda exn: errors.append(exn) or True))
    assert errors == []
    assert [(s["__key__"], sorted(k for k in s if not k.startswith("__"))) for s in samples] == [
        ("000000000", ["jpg", "json", "txt"]), ("000000000", ["jpg", "json", "txt"])]
    assert samples[0]["jpg"] == samples[1]["jpg"]
