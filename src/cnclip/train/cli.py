"""`cnclip train | eval | export`: a thin Typer layer over cnclip.train's Python API.

src/cnclip/cli.py wires these commands in; `python -m cnclip.train.cli train CONFIG` runs the same app
(what torchrun launches: `torchrun --nproc_per_node 8 -m cnclip.train.cli train CONFIG`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from cnclip._common.console import HELP_OPTIONS, error
from cnclip._common.errors import CnclipError, disk_errors
from cnclip._common.strict import validate_mapping
from cnclip.train.config import ConfigError, load_config

app = typer.Typer(help="Train, evaluate and export Chinese CLIP models.", no_args_is_help=True,
                  context_settings=HELP_OPTIONS, pretty_exceptions_show_locals=False)
# Errors a user can fix (bad config, missing shards or weights, a file that is not a checkpoint):
# one line each, exit code 2. Anything else is a bug and keeps its traceback.
USER_ERRORS = (CnclipError,)
ARCHITECTURE_HELP = ("a Chinese-CLIP checkpoint's zoo name (cn-ViT-B-16, ...) or open_clip config file, where "
                     "its shapes do not tell it")


@app.command("train")
def train(
    config: Path = typer.Argument(..., help="training config (YAML), e.g. recipes/train-demo.yaml"),
    stage: str = typer.Option("all", "--stage", help="1, 2 or all (stage 1 then stage 2)"),
    resume: Optional[str] = typer.Option(None, "--resume",
                                         help="a checkpoint to continue from, or 'latest' (the run's newest)"),
    stop_after: Optional[int] = typer.Option(None, "--stop-after", min=1,
                                             help="checkpoint and stop after this many steps (resume later)"),
    fresh: bool = typer.Option(False, "--fresh",
                               help="replace the run in output_dir (removes only the files a run writes)"),
) -> None:
    """Two-stage training: stage 1 with the image tower locked, then stage 2 with everything.

    Rerunning the same config resumes its run (or says it is finished); another config's run in
    output_dir is refused unless --fresh.

    Example: cnclip train recipes/train-demo.yaml --stage all
    """
    if stage not in ("1", "2", "all"):
        error(f"--stage: expected 1, 2 or all (got {stage!r})")
        raise typer.Exit(2)
    try:
        cfg = load_config(config)
        from cnclip.train.loop import train as run_training  # torch: only once the config is valid

        summary = run_training(cfg, stage=stage, resume=resume, stop_after=stop_after, fresh=fresh)
    except USER_ERRORS as err:
        error(str(err))
        raise typer.Exit(2) from None
    if summary.get("finished"):
        typer.echo(f"{cfg.output_dir}: this config's run is finished ({summary['finished']}); nothing to do "
                   "(--fresh trains it again)")
        return
    print_summary(summary)


def print_summary(summary: dict) -> None:
    """Loss per stage and recall before/after: the table `make demo` ends with."""
    if not summary.get("stages"):
        return
    table = Table(title=f"training summary ({summary['output_dir']})")
    for column in ("stage", "steps", "first loss", "last loss", "eval", "mean recall before", "after"):
        table.add_column(column, justify="right" if column != "eval" else "left")
    for number, result in summary["stages"].items():
        losses = result["losses"]
        first = sum(losses[:5]) / len(losses[:5]) if losses else float("nan")
        last = sum(losses[-5:]) / len(losses[-5:]) if losses else float("nan")
        steps = f"{result['start_step']}→{result['end_step']}"
        evals = result["evals"]
        names = list(evals[-1]["sets"]) if evals else ["-"]
        for i, name in enumerate(names):
            before = _score(evals[0]["sets"].get(name)) if evals else "-"
            after = _score(evals[-1]["sets"].get(name)) if evals else "-"
            table.add_row(str(number) if i == 0 else "", steps if i == 0 else "", f"{first:.3f}" if i == 0 else "",
                          f"{last:.3f}" if i == 0 else "", name, before, after)
    Console().print(table)
    if summary.get("stopped"):
        typer.echo("stopped early (--stop-after); continue with --resume latest")


def _score(metrics: Optional[dict]) -> str:
    if not metrics:
        return "-"
    return f"{metrics['mean_recall']:.1f}" if "mean_recall" in metrics else f"top1 {metrics['top1']:.1f}"


@app.command("eval")
def evaluate(
    checkpoint: Path = typer.Argument(..., help="a cnclip training checkpoint or a Chinese-CLIP one (.pt)"),
    data: list[str] = typer.Option(..., "--data", help="eval shards: globs or brace patterns (repeatable), or "
                                                       "one clip_benchmark WebDataset folder"),
    split: str = typer.Option("test", "--split", help="a clip_benchmark folder's split (DIR/SPLIT/nshards.txt)"),
    classnames: Optional[Path] = typer.Option(None, "--classnames",
                                              help="zero-shot: class names, one per line ({key}.cls indexes them); "
                                                   "default: a clip_benchmark folder's classnames.txt"),
    templates: Optional[Path] = typer.Option(None, "--templates",
                                             help="zero-shot prompts, one per line with {} or {c}; default: a "
                                                  "clip_benchmark folder's, else Chinese-CLIP's ImageNet prompts"),
    resize: str = typer.Option("center_crop", "--resize",
                               help="center_crop (open_clip's eval transform) or squash (Chinese-CLIP's: the "
                                    "whole image to size×size, what its published numbers use)"),
    max_samples: Optional[int] = typer.Option(None, "--max-samples", min=1),
    batch_size: int = typer.Option(256, "--batch-size", min=1),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda"),
    precision: str = typer.Option("fp32", "--precision", help="fp32 or bf16"),
    log: Optional[Path] = typer.Option(None, "--log", help="append the metrics to this JSONL file"),
    architecture: Optional[str] = typer.Option(None, "--architecture", help=ARCHITECTURE_HELP),
) -> None:
    """Image<->text Recall@1/5/10 and mean recall (or zero-shot accuracy with --classnames, or on a
    clip_benchmark classification folder).

    Example: cnclip eval runs/demo/checkpoints/stage2-final.pt --data 'data/demo/shards/00002.tar'
    (a Chinese-CLIP checkpoint: cnclip eval clip_cn_rn50.pt --data ...)
    or: cnclip eval CKPT --data evalsets/flickr30k-cn --resize squash (a clip_benchmark folder)
    """
    import tempfile

    import torch

    from cnclip.train.clip_benchmark import resolve_eval_set
    from cnclip.train.config import EvalSet
    from cnclip.train.evaluate import evaluate_set, expected_samples
    from cnclip.train.factory import eval_transform, load_model_from_checkpoint
    from cnclip.train.progress import TrainProgress

    if resize not in ("center_crop", "squash"):
        error(f"--resize: center_crop or squash (got {resize!r})")
        raise typer.Exit(2)
    if device not in ("auto", "cpu", "cuda") or precision not in ("fp32", "bf16"):
        error(f"--device: auto, cpu or cuda; --precision: fp32 or bf16 (got {device!r}, {precision!r})")
        raise typer.Exit(2)
    if device == "cuda" and not torch.cuda.is_available():
        error("--device cuda: no CUDA device is available here (use --device cpu)")
        raise typer.Exit(2)
    try:
        eval_set = validate_mapping(EvalSet, {"name": "cli", "kind": "zeroshot" if classnames else None,
                                              "data": data[0] if len(data) == 1 else data, "split": split,
                                              "max_samples": max_samples, "classnames": classnames,
                                              "templates": templates, "resize": resize}, "cnclip eval", ConfigError)
        eval_set = resolve_eval_set(eval_set, "--data")  # a wrong folder fails before the model loads
        use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
        dev = torch.device("cuda" if use_cuda else "cpu")
        with tempfile.TemporaryDirectory() as workdir:
            model, tokenizer, state = load_model_from_checkpoint(checkpoint, workdir, dev, architecture)
        progress = TrainProgress()
        try:
            with progress.evaluating(eval_set.name, expected_samples(eval_set)) as advance:
                metrics = evaluate_set(model, tokenizer, eval_set, eval_transform(model, resize), device=dev,
                                       precision=precision, batch_size=batch_size, on_batch=advance)
        finally:
            progress.close()
    except USER_ERRORS as err:
        error(str(err))
        raise typer.Exit(2) from None
    record = {"checkpoint": str(checkpoint), "stage": state["stage"], "step": state["step"], "data": data,
              "kind": eval_set.kind, "resize": resize, **metrics}
    table = Table(title=f"{checkpoint} on {', '.join(data)}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in metrics.items():
        table.add_row(key, f"{value:.2f}" if isinstance(value, float) else str(value))
    Console().print(table)
    typer.echo(json.dumps(record, ensure_ascii=False))
    if log is not None:
        try:
            with disk_errors():
                log.parent.mkdir(parents=True, exist_ok=True)
                with open(log, "a", encoding="utf-8") as stream:
                    stream.write(json.dumps(record, ensure_ascii=False) + "\n")
        except CnclipError as err:
            error(f"--log: {err}")
            raise typer.Exit(2) from None


@app.command("export")
def export(
    checkpoint: Path = typer.Argument(..., help="a cnclip training checkpoint or a Chinese-CLIP one (.pt)"),
    directory: Path = typer.Argument(..., help="the output: a folder (--format open_clip) or a .pt file (cn_clip)"),
    architecture: Optional[str] = typer.Option(None, "--architecture", help=ARCHITECTURE_HELP),
    fmt: str = typer.Option("open_clip", "--format",
                            help="open_clip: a local-dir: model folder; cn_clip: a Chinese-CLIP checkpoint file"),
    license: str = typer.Option("other", "--license", help="the model card's license id (e.g. apache-2.0)"),
) -> None:
    """Write an open_clip `local-dir:` model (config, weights, tokenizer files, README.md model
    card; it holds no absolute path: the folder can be moved), or with `--format cn_clip` a
    checkpoint in Chinese-CLIP's own format (what its scripts load).

    Example: cnclip export runs/demo/checkpoints/stage2-final.pt exported/demo
    then: open_clip.create_model_and_transforms('local-dir:exported/demo', **open_clip_kwargs('exported/demo'))
    (open_clip_kwargs from cnclip.train.export; README.md in the folder shows the form without cnclip)
    (a Chinese-CLIP checkpoint: cnclip export clip_cn_rn50.pt exported/rn50)
    cnclip export runs/rn50/checkpoints/stage2-final.pt exported/rn50-cn_clip.pt --format cn_clip
    """
    from cnclip.train.cn_clip_checkpoint import FORMATS

    if fmt not in FORMATS:
        error(f"--format: {' or '.join(FORMATS)} (got {fmt!r})")
        raise typer.Exit(2)
    try:
        if fmt == "cn_clip":
            from cnclip.train.cn_clip_checkpoint import export_cn_clip

            structure = export_cn_clip(checkpoint, directory, architecture)
        else:
            from cnclip.train.export import export_checkpoint

            out = export_checkpoint(checkpoint, directory, license=license, architecture=architecture)
    except USER_ERRORS as err:
        error(str(err))
        raise typer.Exit(2) from None
    if fmt == "cn_clip":
        typer.echo(f"exported to {directory} (cn_clip {structure.name}: {structure.usage(directory)})")
    else:
        typer.echo(f"exported to {out} (load it as its README.md shows: open_clip.create_model_and_transforms("
                   f"'local-dir:{out}', **cnclip.train.export.open_clip_kwargs('{out}')))")


if __name__ == "__main__":
    app()
