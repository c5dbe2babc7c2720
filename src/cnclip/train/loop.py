"""The two-stage training loop: `train(config)` runs stage 1 (image tower locked) then stage 2.

What each stage trains, and its optimizer and schedule, are in stages.py; this is the loop that
drives them: micro-batch accumulation, logging, the evaluation schedule, checkpoints and exact
resume. Stage 1 ends after its steps, or earlier when the first retrieval set's mean recall has not
improved for `stage1.patience` evaluations. Either stage can start from any checkpoint.

Runs under torchrun with DDP (NCCL on GPUs, gloo on CPU); loss is open_clip's ClipLoss.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path
from typing import Optional, Union

import open_clip
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from cnclip._common.console import warn
from cnclip._common.errors import disk_errors
from cnclip._common.library_log import library_log
from cnclip._common.mainguard import default_start_method, require_main_guard
from cnclip.train import checkpoint as ckpt
from cnclip.train import rundir
from cnclip.train.clip_benchmark import resolve_eval_sets
from cnclip.train.config import ConfigError, TrainConfig
from cnclip.train.data import DataError, DataPosition, resolve_train_shards, train_loader, unwrap_worker_error
from cnclip.train.distributed import Runtime, seed_everything
from cnclip.train.evaluate import autocast, evaluate_set, expected_samples
from cnclip.train.factory import build_model, build_tokenizer, eval_transform, transforms
from cnclip.train.runlog import RunLog
from cnclip.train.stages import make_optimizer, make_scheduler, set_stage_mode
from cnclip.train.tokenizer import ChineseTokenizer


class Trainer:
    def __init__(self, cfg: TrainConfig, runtime: Optional[Runtime] = None):
        self.cfg, self.rt = cfg, runtime or Runtime(cfg.device)
        self.out = Path(cfg.output_dir)
        self.ckpt_dir = self.out / "checkpoints"
        seed_everything(cfg.seed + self.rt.rank)
        self.shard_set = resolve_train_shards(cfg.data)
        self.eval_sets = resolve_eval_sets(cfg)
        self.tokenizer = build_tokenizer(cfg, self.shard_set) if self.rt.main else None
        if self.rt.distributed:  # rank 0 may have just built the corpus vocab
            dist.barrier()
        self.tokenizer = self.tokenizer or build_tokenizer(cfg, self.shard_set)
        self.accum = cfg.accumulation(self.rt.world_size)
        self.global_batch = cfg.global_batch(self.rt.world_size)
        self.loss_fn = open_clip.ClipLoss(local_loss=cfg.loss.local_loss, gather_with_grad=cfg.loss.gather_with_grad,
                                          cache_labels=True, rank=self.rt.rank, world_size=self.rt.world_size)
        self.log = RunLog(self.out, enabled=self.rt.main, tensorboard=cfg.tensorboard)

    # -- set-up ----------------------------------------------------------------------------------

    def _setup_model(self, resume_state: Optional[dict]) -> None:
        torch.manual_seed(self.cfg.seed)  # the same initial weights on every rank
        self.model, self.model_cfg = build_model(self.cfg, self.tokenizer, self.rt.device,
                                                 initialise=resume_state is None)
        seed_everything(self.cfg.seed + self.rt.rank)
        if resume_state is not None:
            self.model.load_state_dict(resume_state["model"])
        if self.cfg.grad_checkpointing:
            self.model.set_grad_checkpointing(True)
        self.train_transform, self.val_transform = transforms(self.model, self.cfg.data.augment)

    def _start_loader(self, position: Optional[DataPosition], seed: int) -> None:
        self.position = position or DataPosition(workers=max(self.cfg.data.workers, 1))
        loader = train_loader(
            self.shard_set.shards, self.cfg.data, batch_size=self.cfg.batch_size, transform=self.train_transform,
            tokenizer=self.tokenizer, seed=seed, rank=self.rt.rank, world_size=self.rt.world_size,
            position=position)
        self.batches = iter(loader)

    # -- the run -----------------------------------------------------------------------------------

    def run(self, stage: str = "all", resume: Optional[Union[str, Path]] = None,
            stop_after: Optional[int] = None) -> dict:
        stages = STAGES[str(stage)]
        state = ckpt.load_checkpoint(resume) if resume else None
        # Per-process state (RNG, data position, pending log window) needs the same process count.
        per_rank = state is not None and state["world_size"] == self.rt.world_size
        if state is not None and not per_rank and self.cfg.data.exact_resume:
            raise DataError(f"{resume}: written by {state['world_size']} processes, now {self.rt.world_size}; "
                            f"exact resume needs the same number (or data.exact_resume: false)")
        if state is not None:  # the ids the checkpoint was trained with, whatever the config says now
            self.tokenizer = ChineseTokenizer(state["vocab"].rstrip("\n").split("\n"), state["context_length"],
                                              normalize=True)
        self._setup_model(state)
        start_step, continuing = 0, False
        if state is not None:
            done_stage, complete = state["stage"], state["stage_complete"]
            if complete:  # a finished stage: its weights start the next requested stage
                stages = [s for s in stages if s > done_stage]
                if not stages:
                    raise ckpt.CheckpointError(
                        f"{resume}: stage {done_stage} is complete; nothing left to run for --stage {stage}")
            elif done_stage in stages:  # mid-stage: continue exactly
                stages = [s for s in stages if s >= done_stage]
                start_step, continuing = state["step"], True
            elif done_stage > stages[-1]:
                raise ckpt.CheckpointError(f"{resume}: a stage-2 checkpoint cannot resume stage 1 (use --stage 2)")
            # else: a mid-stage-1 checkpoint starts stage 2 (--stage 2)
        self.log.start(state["log_lines"] if state is not None else 0)
        if state is not None and not per_rank:
            note = (f"checkpoint written by {state['world_size']} processes, now {self.rt.world_size}: "
                    "RNG states and data streams start fresh")
            self.log.event("resume", checkpoint=str(resume), note=note)
            if self.rt.main:
                warn(f"{resume}: {note}")
        self.samples_seen = state["samples_seen"] if state else 0
        self.history = state["history"] if continuing else {"best": None, "bad": 0, "evals": 0}
        position, seed = None, self.cfg.seed
        if per_rank and self.cfg.data.exact_resume:
            position = DataPosition.from_state(state["data"][self.rt.rank])
        elif state is not None:
            seed = self.cfg.seed + 1 + state["samples_seen"]  # fresh streams, not a replay
        self._start_loader(position, seed)
        if per_rank:
            # After the loader starts (creating its iterator draws from torch's RNG), so dropout and
            # everything else random continue as if the run had never stopped, whatever stage comes next.
            ckpt.set_rng_state(state["rng"][self.rt.rank])
        # The steps since the last log line (an exact resume logs the same averages).
        saved = state.get("log_window") if per_rank and continuing else None
        self._resumed_window = saved[self.rt.rank] if saved else None
        try:
            return self._run_stages(stages, state, continuing, start_step, stop_after)
        finally:
            self.log.close()  # the progress bars too, on an error as well

    def _run_stages(self, stages: list[int], state: Optional[dict], continuing: bool, start_step: int,
                    steps_left: Optional[int]) -> dict:
        summary = {"stages": {}, "output_dir": str(self.out)}
        for number in stages:
            first = number == stages[0]
            result = self._run_stage(number, state if continuing and first else None, start_step if first else 0,
                                     steps_left, eval_at_start=first)
            if not first and summary["stages"][number - 1]["evals"]:  # stage 1's end is stage 2's start
                result["evals"].insert(0, {**summary["stages"][number - 1]["evals"][-1], "stage": number, "step": 0})
            summary["stages"][number] = result
            if result["stopped"]:
                summary["stopped"] = True
                break
            if steps_left is not None:
                steps_left -= result["steps_run"]
        return summary

    def _run_stage(self, stage: int, state: Optional[dict], step: int, steps_left: Optional[int],
                   eval_at_start: bool) -> dict:
        cfg = getattr(self.cfg, f"stage{stage}")
        total = cfg.total_steps(self.global_batch)
        model = self.model
        set_stage_mode(model, stage)
        optimizer = make_optimizer(model, cfg)
        scheduler = make_scheduler(optimizer, cfg.warmup, total)
        scaler = torch.amp.GradScaler("cuda", enabled=self.cfg.precision == "fp16")
        if state is not None:
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            if state["scaler"]:
                scaler.load_state_dict(state["scaler"])
        ddp = (DistributedDataParallel(model, device_ids=[self.rt.device] if self.rt.device.type == "cuda" else None)
               if self.rt.distributed else model)
        result = {"stage": stage, "total_steps": total, "start_step": step, "losses": [], "evals": [],
                  "stopped": False, "steps_run": 0, "trainable": sum(p.numel() for p in model.parameters()
                                                                      if p.requires_grad)}
        self.log.progress.stage(stage, step, total)
        if step == 0 and eval_at_start and self.cfg.eval.sets and self.cfg.eval.at_start:
            result["evals"].append(self._evaluate(stage, 0))
        self._open_window(self._resumed_window if state is not None else None)
        self._resumed_window = None
        early = False
        while step < total:
            if steps_left is not None and result["steps_run"] >= steps_left:
                result["stopped"] = True
                self._save(stage, step, False, optimizer, scheduler, scaler)  # the pending window included
                result["losses"].extend(self._window_losses()[self.window_restored:])
                break
            t_data = time.perf_counter()
            micro = [self._next_batch() for _ in range(self.accum)]
            self.data_time += time.perf_counter() - t_data
            loss = self._step(ddp, model, micro, optimizer, scaler, cfg.grad_clip)
            scheduler.step()
            step += 1
            result["steps_run"] += 1
            self.samples_seen += self.global_batch
            self.window.append(loss)  # a detached tensor: no device sync until the log line
            self.log.progress.step(step)
            if step % self.cfg.log_every == 0 or step == total:
                self._log_train(stage, step, scheduler, result)
            if self.cfg.eval.every and step % self.cfg.eval.every == 0 and step < total:
                result["evals"].append(self._evaluate(stage, step))
                early = stage == 1 and self._patience_exhausted(cfg.patience)
            if self.cfg.checkpoint_every and step % self.cfg.checkpoint_every == 0 and step < total and not early:
                self._save(stage, step, False, optimizer, scheduler, scaler)
            if early:
                if self.window:
                    self._log_train(stage, step, scheduler, result)
                self.log.event("stage_switch", stage=stage, step=step, reason="patience")
                break
        shards = self.rt.gather(sorted(self.position.shards))
        # Which shards each rank read: full lists for small runs, counts for large ones.
        self.log.event("data", stage=stage, step=step, shards_by_rank=shards if len(self.shard_set.shards) <= 1000
                       else [len(s) for s in shards])
        if not result["stopped"]:
            if self.cfg.eval.sets and (not result["evals"] or result["evals"][-1]["step"] != step):
                result["evals"].append(self._evaluate(stage, step))
            result["checkpoint"] = str(self._save(stage, step, True, optimizer, scheduler, scaler))
        result["end_step"] = step
        return result

    # -- the log window: the steps since the last train log line ------------------------------------

    def _open_window(self, saved: Optional[dict] = None) -> None:
        """Start a window, or continue the one a checkpoint saved (its losses, data time, elapsed)."""
        saved = saved or {"losses": [], "data_time": 0.0, "elapsed": 0.0}
        self.window = [torch.tensor(v, dtype=torch.float32, device=self.rt.device) for v in saved["losses"]]
        self.window_restored = len(self.window)  # already in an earlier call's summary
        self.data_time = saved["data_time"]
        self.window_t0 = time.perf_counter() - saved["elapsed"]

    def _window_losses(self) -> list[float]:
        return self.rt.means(self.window)  # every process calls this at the same steps

    def _log_train(self, stage: int, step: int, scheduler, result: dict) -> None:
        losses = self._window_losses()
        result["losses"].extend(losses[self.window_restored:])
        elapsed = time.perf_counter() - self.window_t0
        self.log.train(stage=stage, step=step, loss=sum(losses) / len(losses), lr=scheduler.get_last_lr()[0],
                       logit_scale=self.model.logit_scale.exp().item(), samples=self.samples_seen,
                       epoch=(self.samples_seen / self.shard_set.samples if self.shard_set.samples else None),
                       samples_per_s=len(losses) * self.global_batch / elapsed,
                       data_wait=self.data_time / elapsed, bad_samples=self.rt.gather(self.position.bad_samples),
                       bad_shards=self.rt.gather(self.position.bad_shards))
        self._open_window()

    def _next_batch(self) -> dict:
        try:
            batch = next(self.batches)
        except DataError as err:  # e.g. every shard of a worker unreadable
            raise unwrap_worker_error(err) from None
        self.position.advance(batch)
        if batch["errors"]:
            self.log.event("skipped", rank=self.rt.rank, errors=batch["errors"])
        return batch

    def _step(self, ddp, model, micro: list[dict], optimizer, scaler, grad_clip: Optional[float]) -> torch.Tensor:
        """One optimizer step; returns this process's loss as a detached tensor (not synced)."""
        device, precision = self.rt.device, self.cfg.precision
        images = [b["image"].to(device, non_blocking=True) for b in micro]
        texts = [b["text"].to(device, non_blocking=True) for b in micro]
        optimizer.zero_grad(set_to_none=True)
        if len(micro) == 1:
            with autocast(device, precision):
                img, txt, scale = ddp(images[0], texts[0])[:3]
                loss = self.loss_fn(img, txt, scale)
            scaler.scale(loss).backward()
        else:
            # open_clip's feature cache: embed every micro-batch without gradients, then recompute
            # one micro-batch at a time with gradients against the cached rest. The summed gradients
            # equal those of one batch of the accumulated size: each pass gives the features of its
            # micro-batch their share, but the loss's direct dependence on the temperature must count
            # once, so only the last pass (where DDP syncs and every parameter needs a gradient)
            # keeps logit_scale in the graph. (open_clip_train counts it accum_freq times.)
            last = len(micro) - 1
            with torch.no_grad(), autocast(device, precision):
                cached = [ddp(i, t)[:2] for i, t in zip(images, texts, strict=True)]
            for j in range(len(micro)):
                sync = contextlib.nullcontext() if j == last or ddp is model else ddp.no_sync()
                with sync:
                    with autocast(device, precision):
                        img_j, txt_j, scale = ddp(images[j], texts[j])[:3]
                        if j != last:
                            scale = scale.detach()
                        img = torch.cat([c[0] for c in cached[:j]] + [img_j] + [c[0] for c in cached[j + 1:]])
                        txt = torch.cat([c[1] for c in cached[:j]] + [txt_j] + [c[1] for c in cached[j + 1:]])
                        loss = self.loss_fn(img, txt, scale)
                    scaler.scale(loss).backward()
        if grad_clip is not None:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], grad_clip)
        scaler.step(optimizer)
        scaler.update()
        with torch.no_grad():  # the paper's cap on the temperature: logit scale <= 100
            model.logit_scale.clamp_(0, math.log(self.cfg.max_logit_scale))
        return loss.detach().float()

    def _evaluate(self, stage: int, step: int) -> dict:
        record = {"stage": stage, "step": step, "sets": {}}
        if self.rt.main:
            for eval_set in self.eval_sets:
                with self.log.progress.evaluating(eval_set.name, expected_samples(eval_set)) as advance:
                    transform = eval_transform(self.model, self.cfg.eval.resize_for(eval_set))
                    metrics = evaluate_set(self.model, self.tokenizer, eval_set, transform,
                                           device=self.rt.device, precision=self.cfg.precision,
                                           batch_size=self.cfg.eval.batch_size, on_batch=advance)
                record["sets"][eval_set.name] = metrics
                self.log.eval(stage=stage, step=step, name=eval_set.name, metrics=metrics, samples=self.samples_seen)
        record = self.rt.broadcast(record)
        set_stage_mode(self.model, stage)
        return record

    def _patience_exhausted(self, patience: Optional[int]) -> bool:
        if patience is None:
            return False
        name = next(s.name for s in self.eval_sets if s.kind == "retrieval")
        latest = self.log.last_eval[name]["mean_recall"] if self.rt.main else None
        latest = self.rt.broadcast(latest)
        hist = self.history
        hist["evals"] += 1
        if hist["best"] is None or latest > hist["best"]:
            hist["best"], hist["bad"] = latest, 0
        else:
            hist["bad"] += 1
        return hist["bad"] >= patience

    def _save(self, stage: int, step: int, complete: bool, optimizer, scheduler, scaler) -> Optional[Path]:
        rng = self.rt.gather(ckpt.rng_state())
        data = self.rt.gather(self.position.state_dict())
        window = self.rt.gather({"losses": [v.item() for v in self.window], "data_time": self.data_time,
                                 "elapsed": time.perf_counter() - self.window_t0})
        if not self.rt.main:
            return None
        name = f"stage{stage}-final.pt" if complete else f"stage{stage}-step{step:08d}.pt"
        path = ckpt.save_checkpoint(self.ckpt_dir / name, {
            "model": self.model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict() if scaler.is_enabled() else {},
            "stage": stage, "step": step, "stage_complete": complete, "rng": rng, "data": data, "log_window": window,
            "world_size": self.rt.world_size, "samples_seen": self.samples_seen, "history": self.history,
            "log_lines": self.log.lines, "model_cfg": json.dumps(self.model_cfg), "vocab": self.tokenizer.vocab_text,
            "context_length": self.tokenizer.context_length, "config": self.cfg.model_dump_json(),
        })
        ckpt.write_latest(self.ckpt_dir, path)
        ckpt.prune(self.ckpt_dir, self.cfg.keep_checkpoints)
        self.log.event("checkpoint", stage=stage, step=step, path=str(path))
        return path


STAGES = {"1": [1], "2": [2], "all": [1, 2]}


def train(cfg: TrainConfig, stage: str = "all", resume: Optional[Union[str, Path]] = None,
          stop_after: Optional[int] = None, fresh: bool = False) -> dict:
    """Run the configured stages; returns per-stage losses, evaluations and checkpoint paths.

    Reruns like a build (see rundir.py): into an output_dir holding a run of the same config it
    resumes from the latest checkpoint, or returns at once with `finished` (the final checkpoint)
    when the stages are done; another config's run there is a RunDirError unless `fresh`, which
    removes that run's files first. `resume`: "latest" or a checkpoint; mid-stage it continues
    exactly, a finished stage-1 checkpoint starts stage 2. `stop_after`: optimizer steps to run in
    this call before checkpointing and returning (for time-limited jobs; call again to go on).
    """
    if str(stage) not in STAGES:
        raise ConfigError(f"stage: expected 1, 2 or all (got {stage!r})")
    if cfg.data.workers:  # before any work, not when the DataLoader starts
        require_main_guard("cnclip.train.train with data.workers", default_start_method())
    runtime = Runtime(cfg.device)
    plan = rundir.plan_run(cfg, STAGES[str(stage)], resume, fresh)  # every rank reads the same folder
    if runtime.distributed:
        dist.barrier()
    if plan.finished is not None:
        return {"stages": {}, "output_dir": str(cfg.output_dir), "finished": str(plan.finished)}
    if runtime.main:
        rundir.apply_plan(cfg, plan)
    if runtime.distributed:
        dist.barrier()
    # An unwritable output_dir or a full disk is one line, not a traceback; what open_clip,
    # transformers and webdataset log goes to the run's libraries.log, not the terminal.
    with disk_errors():
        Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
        with library_log(Path(cfg.output_dir) / rundir.LIBRARY_LOG):
            return Trainer(cfg, runtime).run(stage, plan.resume, stop_after)
