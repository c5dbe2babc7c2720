"""Rich progress bars and the one-line warnings every stage prints."""

from __future__ import annotations

import contextlib
import os
from typing import Callable, Iterable, Iterator

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

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


def summary_table(title: str, rows: Iterable[tuple[str, object]], columns: tuple[str, str]) -> Table:
    """A stage's summary as a small two-column table (a label, a figure), not a Python dict."""
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, show_edge=False,
                  show_header=any(columns), pad_edge=False)
    table.add_column(columns[0], no_wrap=True)
    table.add_column(columns[1], justify="right")
    for label, value in rows:
        table.add_row(escape(str(label)), escape(str(value)))
    return table


def info(message) -> None:
    """A progress line or a table (any rich renderable) on stderr, unless CNCLIP_QUIET; lines are
    not wrapped (a path or URL stays whole, to copy or grep)."""
    if not _quiet():
        console.print(message, soft_wrap=isinstance(message, str))


def warn(message: str) -> None:
    console.print(f"[yellow]warning:[/yellow] {escape(message)}", soft_wrap=True)


def error(message: str) -> None:
    """One line per problem, never wrapped, so each stays greppable and names its file and key."""
    console.print(f"[red]error:[/red] {escape(message)}", soft_wrap=True)
