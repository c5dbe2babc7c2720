"""Rich progress bars and the one-line warnings every stage prints."""

from __future__ import annotations

import contextlib
import os
from typing import Callable, Iterator

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

console = Console(stderr=True, highlight=False)
# What a command prints as its result (`corpus stats`), so `cnclip ... > file` captures it; the
# progress, warnings and errors stay on stderr.
stdout_console = Console(highlight=False)
# `-h` as well as `--help` on every command (Typer apps take it as context_settings).
HELP_OPTIONS = {"help_option_names": ["-h", "--help"]}


def _quiet() -> bool:
    return os.environ.get("CNCLIP_QUIET", "") not in ("", "0")


@contextlib.contextmanager
def stage_progress(description: str, total: int | None) -> Iterator[Callable[[int], None]]:
    """A progress bar for one step; yields `advance(n=1)`."""
    if _quiet():
        yield lambda n=1: None
        return
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )
    with progress:
        task = progress.add_task(description, total=total)
        yield lambda n=1: progress.advance(task, n)


def info(message: str) -> None:
    if not _quiet():
        console.print(message)


def warn(message: str) -> None:
    console.print(f"[yellow]warning:[/yellow] {escape(message)}", soft_wrap=True)


def error(message: str) -> None:
    """One line per problem, never wrapped, so each stays greppable and names its file and key."""
    console.print(f"[red]error:[/red] {escape(message)}", soft_wrap=True)
