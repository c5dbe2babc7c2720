"""The project's one error base class.

`CnclipError` marks what a user can fix: a bad recipe or config, a missing or damaged input, a
file that is not a checkpoint. The CLIs print such an error as one line and exit 2; they catch
nothing else, so an internal bug keeps its traceback.
"""

from __future__ import annotations


class CnclipError(Exception):
    """An error the user can fix; its message names the file, key or row and what is wrong."""
