"""What training and evaluation show on the terminal.

On a terminal: a rich progress bar per stage (step/total, the latest loss, elapsed time and ETA)
and one per evaluation (images embedded of the set's size when sizes.json gives it), with the
log lines printed above the bars. Where stdout is not a terminal (a file, a pipe, a job log):
the plain log lines only, as a bar redrawn in a file is noise. Under CNCLIP_QUIET: nothing.
Only the process that logs (rank 0) shows anything.
"""

from __future__ import annotations

import contextlib
import os
from typing import Callable, Iterator, Optional

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


def _quiet() -> bool:
    return os.environ.get("CNCLIP_QUIET", "") not in ("", "0")


class TrainProgress:
    """The bars and lines of one training run (or one `cnclip eval`)."""

    def __init__(self, enabled: bool = True, console: Optional[Console] = None):
        self.shown = enabled and not _quiet()
        self.console = console or Console(highlight=False)
        self._bars: Optional[Progress] = None
        self._stage: Optional[TaskID] = None
        if self.shown and self.console.is_terminal:
            self._bars = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                  TextColumn("{task.fields[note]}"), TimeElapsedColumn(), TextColumn("ETA"),
                                  TimeRemainingColumn(), console=self.console, transient=False)

    @property
    def live(self) -> bool:
        """Whether bars are drawn (a terminal, not quiet)."""
        return self._bars is not None

    def line(self, text: str) -> None:
        """A log line: above the bars on a terminal, a plain line otherwise."""
        if not self.shown:
            return
        if self._bars is not None:
            self._bars.console.print(text, markup=False, highlight=False, soft_wrap=True)
        else:
            print(text, flush=True)

    def stage(self, stage: int, step: int, total: int) -> None:
        """Start stage `stage`'s bar at `step` of `total` (a resumed stage starts where it stopped)."""
        if self._bars is None:
            return
        self._bars.start()
        if self._stage is not None:
            self._bars.stop_task(self._stage)
        self._stage = self._bars.add_task(f"stage {stage}", total=total, completed=step, note="")

    def step(self, step: int, loss: Optional[float] = None) -> None:
        if self._bars is None or self._stage is None:
            return
        if loss is None:
            self._bars.update(self._stage, completed=step)
        else:
            self._bars.update(self._stage, completed=step, note=f"loss {loss:.4f}")

    @contextlib.contextmanager
    def evaluating(self, name: str, total: Optional[int]) -> Iterator[Callable[[int], None]]:
        """A bar for one evaluation set while it is embedded (removed after); yields `advance(images)`."""
        if self._bars is None:
            yield lambda n: None
            return
        self._bars.start()
        task = self._bars.add_task(f"eval {name}", total=total, note="")
        try:
            yield lambda n: self._bars.advance(task, n)
        finally:
            self._bars.remove_task(task)

    def close(self) -> None:
        if self._bars is not None:
            self._bars.stop()
