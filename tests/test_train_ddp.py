"""torchrun with 2 gloo processes on the CPU: ranks read different shards, and the loss equals a
single process's on the same global batches."""

import os
import subprocess
import sys

import pytest
import yaml

from cnclip.train.runlog import read_log
from conftest import free_port
from test_train_support import shape_samples, write_shards

pytestmark = pytest.mark.slow


def write_config(root, name, shards, batch_size):
    config = {
        "name": name, "output_dir": str(root / name), "model": "cn-tiny", "seed": 0,
        "tokenizer": {"vocab": "bert-base-chinese"},
        "data": {"train": shards, "workers": 0, "shuffle_buffer": 0, "augment": False},
        "batch_size": batch_size, "log_every": 1,
        "loss": {"local_loss": True, "gather_with_grad": True},
        "stage1": {"steps": 3, "lr": 2e-3}, "stage2": {"steps": 3, "lr": 1e-3},
    }
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config, allow_unicode=True), encoding="utf-8")
    return path


def run(args, **kwargs):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CNCLIP_QUIET": "1"}
    result = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=300, **kwargs)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_two_gloo_processes_match_one(tmp_path):
    samples = shape_samples(96, seed=3)
    a, b = samples[:48], samples[48:]
    two = write_shards(tmp_path / "two", a + b, per_shard=48)  # one shard per rank
    # The single process reads the same global batches: rank 0's 8 samples + rank 1's 8, step by step.
    interleaved = [s for k in range(6) for s in a[8 * k:8 * k + 8] + b[8 * k:8 * k + 8]]
    one = write_shards(tmp_path / "one", interleaved, per_shard=96)

    run(["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
         "-m", "cnclip.train.cli", "train", str(write_config(tmp_path, "ddp", two, batch_size=8))])
    run(["-m", "cnclip.train.cli", "train", str(write_config(tmp_path, "single", one, batch_size=16))])

    ddp, single = read_log(tmp_path / "ddp", "train"), read_log(tmp_path / "single", "train")
    assert [(r["stage"], r["step"]) for r in ddp] == [(r["stage"], r["step"]) for r in single] and len(ddp) == 6
    for d, s in zip(ddp, single, strict=True):
        assert d["loss"] == pytest.approx(s["loss"], rel=1e-5, abs=1e-5)
    assert ddp[-1]["loss"] != pytest.approx(ddp[0]["loss"], abs=1e-3)  # it trained
    # Each rank read its own shard, and together they read both.
    for record in read_log(tmp_path / "ddp", "data"):
        rank0, rank1 = (set(shards) for shards in record["shards_by_rank"])
        assert len(rank0) == len(rank1) == 1 and rank0 | rank1 == set(two)
    # Both ranks' data positions are in the checkpoint (for an exact multi-process resume).
    from cnclip.train.checkpoint import load_checkpoint

    state = load_checkpoint(tmp_path / "ddp" / "checkpoints" / "stage2-final.pt")
    assert state["world_size"] == 2 and len(state["data"]) == 2
    assert [d["batches"] for d in state["data"]] == [6, 6]
