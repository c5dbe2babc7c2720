"""Training throughput: cnclip's trainer against open_clip_train, same model, shards and settings.

    .venv/bin/python bench/bench_train.py            # tiny model, CPU, ~2.5 minutes on 2 cores
    .venv/bin/python bench/bench_train.py --device cuda --model cn-ViT-B-16 --precision bf16 --batch-size 128

Both trainers start from the same initial weights (a cnclip export as an open_clip `local-dir:`
model), read the same WebDataset shards (coloured shapes with Chinese captions, written here) with
the same batch size, workers, precision, optimizer settings, resampled shard streams and open_clip's
train transform, and
train everything (our stage 2) and with the image tower locked (our stage 1 vs `--lock-image`).
Throughput is samples/s over each run's log windows after the first (warm-up) one: both count a
window's wall-clock, data waits included. Prints one line per run and the ratio ours / theirs.

CNCLIP_BENCH_SMALL=1 (bench/sizes.py) changes the defaults below (SIZES) to a few steps of batch 16
on 2 shards of 32 images, one run per trainer and mode; options given still win.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("CNCLIP_QUIET", "1")

from sizes import announce, size  # noqa: E402

# The option defaults that size a run; log windows after the first are timed, so small mode keeps three.
SIZES = size({"batch_size": 64, "steps": 96, "log_every": 16, "shards": 8, "per_shard": 256, "repeats": 2},
             {"batch_size": 16, "steps": 6, "log_every": 2, "shards": 2, "per_shard": 32, "repeats": 1})


def write_bench_shards(folder: Path, shards: int, per_shard: int, side: int) -> list[str]:
    from shapes import shape_samples, write_shards

    return write_shards(folder, shape_samples(shards * per_shard, seed=0, side=side), per_shard=per_shard)


def base_config(root: Path, args, shards: list[str], name: str, steps: int) -> dict:
    return {
        "name": name, "output_dir": str(root / name), "model": args.model, "seed": 0,
        "tokenizer": {"vocab": "bert-base-chinese"}, "device": args.device,
        "data": {"train": shards, "workers": args.workers, "shuffle_buffer": 1000, "resampled": True},
        "batch_size": args.batch_size, "precision": args.precision, "log_every": args.log_every,
        "stage1": {"steps": steps, "lr": 1e-3, "warmup": 10, "weight_decay": 0.1},
        "stage2": {"steps": steps, "lr": 1e-3, "warmup": 10, "weight_decay": 0.1},
    }


def ours(root: Path, args, shards: list[str], init: Path, stage: str, rep: int) -> float:
    from cnclip.train.config import parse_config
    from cnclip.train.loop import train
    from cnclip.train.runlog import read_log

    name = f"ours-stage{stage}-{rep}"
    cfg = base_config(root, args, shards, name, args.steps)
    cfg["init"] = {"clip": str(init)}
    train(parse_config(cfg, name), stage=stage)
    windows = [r["samples_per_s"] for r in read_log(root / name, "train")]
    return statistics.mean(windows[1:])


def theirs(root: Path, args, shards: list[str], model_dir: Path, locked: bool, rep: int) -> float:
    name = f"open_clip_train-{'locked' if locked else 'full'}-{rep}"
    first, last = Path(shards[0]).stem, Path(shards[-1]).stem
    command = [
        sys.executable, "-m", "open_clip_train.main",
        "--train-data", str(Path(shards[0]).parent / f"{{{first}..{last}}}.tar"),
        # Resampled shards and one epoch of exactly the steps we run: no loader restarts on either side.
        "--dataset-resampled", "--train-num-samples", str(args.steps * args.batch_size),
        "--dataset-type", "webdataset",
        "--model", f"local-dir:{model_dir}", "--batch-size", str(args.batch_size), "--epochs", "1",
        "--workers", str(args.workers), "--lr", "1e-3", "--wd", "0.1", "--warmup", "10",
        "--precision", {"fp32": "fp32", "bf16": "amp_bf16", "fp16": "amp"}[args.precision],
        "--device", args.device, "--log-every-n-steps", str(args.log_every), "--save-frequency", "0",
        "--zeroshot-frequency", "0", "--val-frequency", "0", "--report-to", "",
        "--logs", str(root / "logs"), "--name", name, "--seed", "0",
    ]
    if locked:
        command += ["--lock-image", "--lock-image-freeze-bn-stats"]
    # From inside the export: open_clip resolves its BERT tower's folder ("." in a movable export)
    # from the working directory; every other path here is absolute.
    result = subprocess.run(command, capture_output=True, text=True, cwd=model_dir)
    output = result.stdout + result.stderr
    if result.returncode != 0:
        raise SystemExit(f"open_clip_train failed:\n{output[-3000:]}")
    # "Batch (t): 0.123" is the mean step time over the log window (meters reset per window).
    times = [float(t) for t in re.findall(r"Batch \(t\): ([0-9.]+)", output)]
    rates = [args.batch_size / t for t in times[1:] if t > 0]
    if not rates:
        raise SystemExit(f"open_clip_train logged no step times:\n{output[-3000:]}")
    return statistics.mean(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="cn-tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--batch-size", type=int, default=SIZES["batch_size"])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=SIZES["steps"])
    parser.add_argument("--log-every", type=int, default=SIZES["log_every"])
    parser.add_argument("--shards", type=int, default=SIZES["shards"])
    parser.add_argument("--per-shard", type=int, default=SIZES["per_shard"])
    parser.add_argument("--modes", default="full,locked", help="full (stage 2), locked (stage 1), or both")
    parser.add_argument("--repeats", type=int, default=SIZES["repeats"],
                        help="runs per trainer and mode (median reported)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args()

    from cnclip.train.config import parse_config
    from cnclip.train.export import export_checkpoint
    from cnclip.train.loop import train
    from cnclip.train.models import get_model_config

    announce()
    root = Path(tempfile.mkdtemp(prefix="bench_train_"))
    try:
        side = get_model_config(args.model)["vision_cfg"]["image_size"]
        shards = write_bench_shards(root / "shards", args.shards, args.per_shard, side)
        # The shared starting point: our model at step 0 (stage 1 of 0 steps), exported for open_clip.
        init_cfg = base_config(root, args, shards, "init", 0)
        train(parse_config(init_cfg, "init"), stage="1")
        init = root / "init" / "checkpoints" / "stage1-final.pt"
        model_dir = export_checkpoint(init, root / "init-open_clip")
        results = {}
        for mode in args.modes.split(","):
            locked = mode == "locked"
            # Alternate the order (ours, theirs, theirs, ours, …) so drifting load on a shared machine
            # hits both sides alike; report each side's median.
            rates: dict[str, list[float]] = {"cnclip": [], "open_clip_train": []}
            for rep in range(args.repeats):
                order = ["cnclip", "open_clip_train"] if rep % 2 == 0 else ["open_clip_train", "cnclip"]
                for who in order:
                    if who == "cnclip":
                        rates[who].append(ours(root, args, shards, init, "1" if locked else "2", rep))
                    else:
                        rates[who].append(theirs(root, args, shards, model_dir, locked, rep))
            ours_rate, their_rate = (statistics.median(rates[k]) for k in ("cnclip", "open_clip_train"))
            results[mode] = {"cnclip": round(ours_rate, 1), "open_clip_train": round(their_rate, 1),
                             "ratio": round(ours_rate / their_rate, 3),
                             "runs": {k: [round(r, 1) for r in v] for k, v in rates.items()}}
            print(f"{args.model} {mode:6s} batch {args.batch_size} {args.precision} on {args.device}: "
                  f"cnclip {ours_rate:8.1f} samples/s | open_clip_train {their_rate:8.1f} samples/s | "
                  f"ratio {ours_rate / their_rate:.2f}x  (medians of {args.repeats})", flush=True)
        print(json.dumps({"model": args.model, "device": args.device, "precision": args.precision,
                          "batch_size": args.batch_size, "workers": args.workers, "results": results}))
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
