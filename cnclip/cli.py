"""The `cnclip` console script: one entry point, one sub-command group per package."""

from __future__ import annotations

import typer

from cnclip.corpus.cli import app as corpus_app

app = typer.Typer(help="cnclip: build Chinese image-text corpora and train Chinese CLIP on them.",
                  no_args_is_help=True,
                  pretty_exceptions_show_locals=False)
app.add_typer(corpus_app, name="corpus")

if __name__ == "__main__":
    app()
