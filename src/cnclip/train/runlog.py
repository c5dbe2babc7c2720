"""The run's log: one JSON object per line in `<output_dir>/log.jsonl`, a short line on stdout
(above the progress bars on a terminal, progress.py), and TensorBoard scalars when asked. Every
scalar, train and eval alike, is plotted over samples seen since the run began, so both stages
share one x-axis (a step count restarts at stage 2). Only rank 0 writes."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Optional

from cnclip._common.console import warn
from cnclip.train.progress import TrainProgress


class RunLog:
    def __init__(self, output_dir: Path, enabled: bool = True, tensorboard: bool = False):
        self.path = Path(output_dir) / "log.jsonl"
        self.enabled = enabled
        self.lines = 0
        self.last_eval: dict[str, dict] = {}
        self._stream = None
        self._tb = None
        self.progress = TrainProgress(enabled)
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(Path(output_dir) / "tensorboard"))
            except ImportError:
                warn("tensorboard: not installed (pip install tensorboard); logging to log.jsonl only")

    def start(self, keep_lines: int) -> None:
        """Open the log keeping its first `keep_lines` records: a resumed run continues the log of
        the checkpoint it resumed from, so its lines read as if it had never stopped."""
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = self.path.read_text(encoding="utf-8").splitlines()[:keep_lines] if self.path.is_file() else []
        self.path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        self.lines = len(kept)
        self._stream = open(self.path, "a", encoding="utf-8")

    def _write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"time": round(time.time(), 3), **record}
        self._stream.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._stream.flush()
        self.lines += 1

    def train(self, **fields: Any) -> None:
        self._write({"event": "train", **fields})
        if self.enabled:
            epoch = f" epoch {fields['epoch']:.2f}" if fields.get("epoch") is not None else ""
            self.progress.line(f"stage {fields['stage']} step {fields['step']}: loss {fields['loss']:.4f} "
                               f"lr {fields['lr']:.2e} scale {fields['logit_scale']:.1f} "
                               f"{fields['samples_per_s']:.0f} samples/s{epoch}")
            self.progress.step(fields["step"], fields["loss"])
        if self._tb is not None:
            global_step = fields["samples"]
            for key in ("loss", "lr", "logit_scale", "samples_per_s"):
                self._tb.add_scalar(f"train/{key}", fields[key], global_step)

    def eval(self, stage: int, step: int, name: str, metrics: dict, samples: int) -> None:
        """One set's metrics at `step` of `stage`, `samples` seen by then (the TensorBoard x-axis)."""
        self.last_eval[name] = metrics
        self._write({"event": "eval", "stage": stage, "step": step, "set": name, **metrics})
        if self.enabled:
            shown = " ".join(f"{k} {v:.2f}" for k, v in metrics.items() if isinstance(v, float))
            self.progress.line(f"eval {name} (stage {stage} step {step}): {shown}")
        if self._tb is not None:
            for key, value in metrics.items():
                self._tb.add_scalar(f"eval/{name}/{key}", value, samples)

    def event(self, kind: str, **fields: Any) -> None:
        self._write({"event": kind, **fields})

    def close(self) -> None:
        self.progress.close()
        if self._stream is not None:
            self._stream.close()
            self._stream = None
        if self._tb is not None:
            self._tb.close()


def read_log(output_dir: Path, event: Optional[str] = None) -> list[dict]:
    path = Path(output_dir) / "log.jsonl"
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [r for r in records if event is None or r["event"] == event]
