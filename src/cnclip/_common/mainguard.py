"""Refuse to start worker processes from a script's unguarded top level.

The corpus stages (LocalEngine, img2dataset) start worker processes with 'spawn', and so do
DataLoader workers wherever the start method is 'spawn' or 'forkserver'. A spawned process runs the
main script again, as `__mp_main__`, to find the worker function: code outside
`if __name__ == "__main__":` runs once more in every worker, and a build called there starts a
build in each of them (one unguarded script's build printed 174 tracebacks, its workers fighting
over the sample web's port). Python only notices later, and inside the workers.

So before starting any process, `require_main_guard` looks at the main script's top-level frame,
if one is running: the line it is executing must lie in the body of an
`if __name__ == "__main__":` block (or the else branch of `if __name__ != "__main__":`), which
`ast` tells from the script's source. Anything it cannot judge (no script file: a REPL, `python -c`,
a notebook; no readable source) is allowed: the check only refuses what certainly fails.
"""

from __future__ import annotations

import ast
import functools
import multiprocessing
import sys
import tokenize
from types import FrameType
from typing import Optional

from cnclip._common.errors import CnclipError

RERUNS_MAIN = ("spawn", "forkserver")  # start methods whose workers re-run the main script


class UnguardedMainError(CnclipError, SystemExit):
    """Worker processes requested from a script's top level outside `if __name__ == "__main__":`.

    Also a SystemExit: left uncaught in the script, Python prints only `code`, the one-line message
    (no traceback), and exits 1. It is still an Exception (and a CnclipError) for code that catches.
    """

    def __init__(self, message: str):
        super().__init__(message)
        self.code = f"error: {message}"  # SystemExit.__init__ is not reached through this MRO


def _is_main_test(node: ast.expr, op: type) -> bool:
    """`__name__ == "__main__"` (either side), with `op` the comparison operator's type."""
    if not (isinstance(node, ast.Compare) and len(node.ops) == 1 and isinstance(node.ops[0], op)):
        return False
    sides = [node.left, node.comparators[0]]
    names = [s for s in sides if isinstance(s, ast.Name) and s.id == "__name__"]
    texts = [s for s in sides if isinstance(s, ast.Constant) and s.value == "__main__"]
    return len(names) == 1 and len(texts) == 1


@functools.lru_cache(maxsize=32)
def guarded_ranges(path: str) -> Optional[tuple[tuple[int, int], ...]]:
    """The line ranges of a script that only run when it is the main program; None if unreadable."""
    try:
        with tokenize.open(path) as stream:
            tree = ast.parse(stream.read(), path)
    except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
        return None
    ranges = []
    for node in ast.walk(tree):
        if isinstance(node, ast.If):
            body = node.body if _is_main_test(node.test, ast.Eq) else (
                node.orelse if _is_main_test(node.test, ast.NotEq) else [])
            if body:
                ranges.append((body[0].lineno, max(getattr(s, "end_lineno", s.lineno) for s in body)))
    return tuple(ranges)


def _main_script_frame() -> Optional[FrameType]:
    """The frame running the main module's top-level code, if it is still on the stack."""
    main = sys.modules.get("__main__")
    if main is None or not getattr(main, "__file__", None):
        return None  # a REPL, `python -c`, a notebook: spawned workers run nothing of it again
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "<module>" and frame.f_globals is vars(main):
            return frame
        frame = frame.f_back
    return None


def unguarded_call_site() -> Optional[tuple[str, int]]:
    """(script, line) when this call comes from a main script's top level outside the guard."""
    frame = _main_script_frame()
    if frame is None:
        return None
    path, line = frame.f_code.co_filename, frame.f_lineno
    ranges = guarded_ranges(path)
    if ranges is None or any(start <= line <= end for start, end in ranges):
        return None
    return path, line


def require_main_guard(what: str, start_method: str = "spawn") -> None:
    """Raise UnguardedMainError (one line naming the script and line) when `what` would start
    worker processes with `start_method` from an unguarded script top level; else nothing."""
    if start_method not in RERUNS_MAIN:
        return
    site = unguarded_call_site()
    if site is not None:
        raise UnguardedMainError(
            f"{site[0]}:{site[1]}: {what} starts worker processes, which re-run this script; put the call "
            "under `if __name__ == \"__main__\":` (see the README's Python API)")


def default_start_method() -> str:
    """The start method a context-less multiprocessing call would use, without fixing it."""
    return multiprocessing.get_start_method(allow_none=True) or multiprocessing.get_all_start_methods()[0]
