"""`cnclip train report RUN_DIR`, and the `train` group that keeps `cnclip train CONFIG` working.

`cnclip train` stays the training command (`cnclip train CONFIG [OPTIONS]`, `cnclip train
--help`); only a first argument naming a sub-command (`report`) goes elsewhere. A config file
literally named `report` can still be trained as `cnclip train ./report`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from typer.core import TyperCommand, TyperGroup

from cnclip._common.console import error
from cnclip._common.errors import CnclipError

TRAIN_COMMAND = "run"  # the hidden name of `cnclip train CONFIG` inside the group


class DefaultToTrain(TyperGroup):
    """A group whose arguments go to its default command unless the first names another one."""

    def parse_args(self, ctx, args):
        if not args or args[0] not in self.commands or args[0] == TRAIN_COMMAND:
            args = [TRAIN_COMMAND, *args]
        return super().parse_args(ctx, args)

    def resolve_command(self, ctx, args):
        """The default command's usage line reads `cnclip train [OPTIONS] CONFIG`, without its hidden name."""
        name, command, rest = super().resolve_command(ctx, args)
        return ("" if name == TRAIN_COMMAND else name), command, rest


class _UnnamedContext(TyperCommand.context_class):  # typer's own click Context
    @property
    def command_path(self) -> str:
        """`cnclip train` for the default command (its empty name would leave a double space)."""
        return super().command_path.rstrip()


class _DefaultCommand(TyperCommand):
    context_class = _UnnamedContext


def report(
    run_dir: Path = typer.Argument(..., help="a training run's output_dir, e.g. runs/demo"),
    out: Optional[Path] = typer.Option(None, "--out", help="the HTML file to write (default RUN_DIR/report.html)"),
) -> None:
    """Write one self-contained HTML page about a run: loss, learning rate, logit scale and
    retrieval curves over samples seen across both stages, throughput, data wait, the config.

    Example: cnclip train report runs/demo --out demo-run.html
    """
    from cnclip.report.train import write_train_report

    try:
        path = write_train_report(run_dir, out)
    except CnclipError as err:
        error(str(err))
        raise typer.Exit(2) from None
    typer.echo(f"report -> {path}")


def train_group(train_command) -> typer.Typer:
    """`cnclip train ...`: the training command by default, `report` beside it."""
    group = typer.Typer(cls=DefaultToTrain, help="Train Chinese CLIP (cnclip train CONFIG), or report on a run "
                                                 "(cnclip train report RUN_DIR).",
                        pretty_exceptions_show_locals=False)
    group.command(TRAIN_COMMAND, hidden=True, cls=_DefaultCommand)(train_command)
    group.command("report")(report)
    return group
