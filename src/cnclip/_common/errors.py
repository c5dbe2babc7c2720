"""The project's one error base class.

`CnclipError` marks what a user can fix: a bad recipe or config, a missing or damaged input, a
file that is not a checkpoint. The CLIs print such an error as one line and exit 2; they catch
nothing else, so an internal bug keeps its traceback.
"""

from __future__ import annotations

import contextlib
import errno
from typing import Iterator


class CnclipError(Exception):
    """An error the user can fix; its message names the file, key or row and what is wrong."""


class DiskError(CnclipError, OSError):
    """The system refused to let a file be written or read: no permission, a read-only or full disk."""


# OS refusals about a named path are the machine's state, which the user can fix; any other OSError
# (a file the code itself expected, say) is a bug and keeps its traceback.
_USER_ERRNOS = frozenset({errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.ENOTDIR,
                          errno.EISDIR, errno.ENAMETOOLONG, errno.ELOOP})


@contextlib.contextmanager
def disk_errors() -> Iterator[None]:
    """Turn an OSError the user can fix (see _USER_ERRNOS) into a one-line DiskError naming the path."""
    try:
        yield
    except CnclipError:
        raise
    except OSError as err:
        if err.errno not in _USER_ERRNOS or err.filename is None:
            raise
        raise DiskError(f"{err.filename}: {err.strerror}") from None
