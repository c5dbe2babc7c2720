"""The benchmarks' one switch between full size and a small mode: CNCLIP_BENCH_SMALL=1.

At full size (the default) a benchmark takes minutes and its figures are the README's. In small
mode every benchmark runs the same code paths on tiny inputs in seconds, so the test suite
(tests/test_benchmarks.py) can run them all and notice one that no longer runs; its figures then
say nothing about speed, which the note printed with them says.
Not named bench_*.py: `make bench` runs every such file.
"""

from __future__ import annotations

import os
from typing import TypeVar

T = TypeVar("T")

NOTE = "(small mode: figures are not the benchmark's)"


def small() -> bool:
    """Whether this run is the small mode: only the exact value "1" turns it on, so that a stray
    or empty variable can never shrink a full-size run."""
    return os.environ.get("CNCLIP_BENCH_SMALL", "") == "1"


def size(full: T, tiny: T) -> T:
    """`tiny` in small mode, else `full`: each benchmark picks all its sizes through this, in one
    place at its top."""
    return tiny if small() else full


def announce() -> None:
    """Print the small-mode note (nothing at full size, whose output stays as it was)."""
    if small():
        print(NOTE, flush=True)
