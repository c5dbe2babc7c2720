"""The `cnclip` console script: one entry point, one sub-command group per package."""

from __future__ import annotations

from typing import Optional

import typer

from cnclip import __version__
from cnclip._common.console import HELP_OPTIONS
from cnclip.corpus.cli import app as corpus_app
from cnclip.report.cli import train_group
from cnclip.search import cli as search_cli
from cnclip.train import cli as train_cli

app = typer.Typer(help="cnclip: build Chinese image-text corpora and train Chinese CLIP on them.",
                  no_args_is_help=True, context_settings=HELP_OPTIONS,
                  pretty_exceptions_show_locals=False)


def _show_version(value: bool) -> None:
    if value:
        typer.echo(f"cnclip {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Optional[bool] = typer.Option(None, "--version", callback=_show_version, is_eager=True,
                                           help="print the version and exit"),
) -> None:
    """cnclip: build Chinese image-text corpora and train Chinese CLIP on them."""


corpus_app.command("index")(search_cli.index)
app.add_typer(corpus_app, name="corpus")
app.add_typer(train_group(train_cli.train), name="train")
app.command("eval")(train_cli.evaluate)
app.command("export")(train_cli.export)
app.command("search")(search_cli.search)

if __name__ == "__main__":
    app()
