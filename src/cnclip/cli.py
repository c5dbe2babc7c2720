"""The `cnclip` console script: one entry point, one sub-command group per package."""

from __future__ import annotations

import typer

from cnclip.corpus.cli import app as corpus_app
from cnclip.search import cli as search_cli
from cnclip.train import cli as train_cli

app = typer.Typer(help="cnclip: build Chinese image-text corpora and train Chinese CLIP on them.",
                  no_args_is_help=True,
                  pretty_exceptions_show_locals=False)
corpus_app.command("index")(search_cli.index)
app.add_typer(corpus_app, name="corpus")
app.command("train")(train_cli.train)
app.command("eval")(train_cli.evaluate)
app.command("export")(train_cli.export)
app.command("search")(search_cli.search)

if __name__ == "__main__":
    app()
