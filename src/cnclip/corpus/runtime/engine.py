"""Runs a stage's per-part function over all parts.

Stage code hands the engine a picklable function and a list of part descriptions; it does not
know whether the parts run inline, in a local process pool, or (later) on Spark.
"""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from typing import Callable, Iterator, Sequence, TypeVar

from cnclip._common.mainguard import require_main_guard

from cnclip._common.console import stage_progress

Part = TypeVar("Part")
Result = TypeVar("Result")


class LocalEngine:
    """A process pool on this machine ('spawn': polars and OpenCV are not fork-safe)."""

    def __init__(self, processes: int = 1):
        self.processes = max(1, processes)

    def map_parts(
        self, fn: Callable[[Part], Result], parts: Sequence[Part], description: str
    ) -> list[Result]:
        """fn over every part; results in the order of `parts`, with a progress bar."""
        if self.processes > 1 and len(parts) > 1:  # before the pool: its workers would re-run an unguarded script
            require_main_guard(description)
        results: list[Result] = []
        with stage_progress(description, total=len(parts)) as advance:
            for result in self._run(fn, parts):
                results.append(result)
                advance()
        return results

    def _run(self, fn: Callable[[Part], Result], parts: Sequence[Part]) -> Iterator[Result]:
        if self.processes == 1 or len(parts) <= 1:
            yield from map(fn, parts)
            return
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(min(self.processes, len(parts)), mp_context=context) as pool:
            yield from pool.map(fn, parts)

