"""`file://` image URLs, read by the download worker's guard under the same size and time limits
as HTTP.

urllib (img2dataset's fetcher) opens `file://` URLs itself, with no size cap and no timeout: a
metadata row could publish `/etc/passwd`, grow a worker without bound on `/dev/zero`, or hang it
on a FIFO. The guarded opener each download worker installs (net/opener.py) has no urllib
FileHandler: it reads the file here, and only when it is a regular file under one of
`download.allow_local_files` once every symlink is resolved.
"""

from __future__ import annotations

import errno
import mimetypes
import os
import stat
import time
from email.message import Message
from pathlib import Path
from typing import Sequence
from urllib.parse import unquote, urlsplit

from cnclip.corpus.net.fetch import Response
from cnclip.corpus.net.reasons import (
    BAD_URL,
    LOCAL_FILE_NOT_ALLOWED,
    LOCAL_FILE_UNREADABLE,
    NOT_REGULAR_FILE,
    TIMEOUT,
    TOO_LARGE,
)

_CHUNK = 1024 * 1024
_clock, _read = time.monotonic, os.read  # module names, so a test can stand in a slow disk or an endless file
# O_NONBLOCK: opening a FIFO for reading must not wait for a writer; O_NOFOLLOW: the last
# component may not have become a symlink since it was resolved.
_OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NOCTTY", 0) | \
    getattr(os, "O_CLOEXEC", 0)


def is_file_url(url: str) -> bool:
    return url[:5].lower() == "file:"


def file_subject(url: str) -> str:
    """What a refusal names: the URL's path as sent (percent-encoded), `file://` dropped."""
    try:
        return urlsplit(url).path[:160] or url[:160]
    except ValueError:
        return url[:160]


def resolve_roots(folders: Sequence[str]) -> tuple[str, ...]:
    """The allowed folders with every symlink resolved, as the files in them will be."""
    return tuple(os.path.realpath(folder) for folder in folders)


def _inside(path: str, roots: Sequence[str]) -> bool:
    return any(Path(path).is_relative_to(root) for root in roots)


def _opened_path(fd: int) -> str | None:
    """The path the kernel says an open descriptor names (Linux), to catch a folder on the way
    swapped for a symlink between the check and the open; None where /proc is not there."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return None


def local_path(url: str) -> str:
    """The local path a `file:` URL names; ValueError for another host or no absolute path."""
    parts = urlsplit(url)
    if parts.netloc.lower() not in ("", "localhost"):
        raise ValueError(f"file URL on host {parts.netloc[:80]!r}")
    path = unquote(parts.path)
    if not path.startswith("/") or "\x00" in path:
        raise ValueError("no absolute path")
    return path


def read_local_file(url: str, roots: Sequence[str], *, max_bytes: int, timeout: float) -> Response:
    """The file a `file://` URL names, as an HTTP-like answer, or a refusal reason."""
    if not roots:
        return Response(url, reason=LOCAL_FILE_NOT_ALLOWED,
                        detail=f"{url[:200]}: file:// URLs are read only from download.allow_local_files folders")
    try:
        path = local_path(url)
    except ValueError as err:
        return Response(url, reason=BAD_URL, detail=f"{url[:200]}: {err}")
    real = os.path.realpath(path)
    if not _inside(real, roots):
        return Response(url, reason=LOCAL_FILE_NOT_ALLOWED,
                        detail=f"{path[:200]} (resolves to {real[:200]}) is outside download.allow_local_files")
    try:
        fd = os.open(real, _OPEN_FLAGS)
    except OSError as err:
        # ENXIO: a socket; ELOOP: the name became a symlink after it was resolved.
        reason = NOT_REGULAR_FILE if err.errno in (errno.ENXIO, errno.ELOOP) else LOCAL_FILE_UNREADABLE
        return Response(url, reason=reason, detail=f"{path[:200]}: {err.strerror}")
    try:
        return _read_open_file(url, path, fd, roots, max_bytes, _clock() + timeout)
    finally:
        os.close(fd)


def _read_open_file(url: str, path: str, fd: int, roots: Sequence[str], max_bytes: int,
                    deadline: float) -> Response:
    info = os.fstat(fd)  # of what was opened, not of a name that may have changed since
    if not stat.S_ISREG(info.st_mode):
        return Response(url, reason=NOT_REGULAR_FILE, detail=f"{path[:200]}: not a regular file")
    opened = _opened_path(fd)
    if opened is not None and not _inside(opened, roots):
        return Response(url, reason=LOCAL_FILE_NOT_ALLOWED,
                        detail=f"{path[:200]} (opened {opened[:200]}) is outside download.allow_local_files")
    if info.st_size > max_bytes:
        return Response(url, reason=TOO_LARGE, detail=f"{path[:200]}: {info.st_size} bytes, over the "
                                                      f"{max_bytes}-byte limit")
    chunks, size = [], 0
    while chunk := _read(fd, _CHUNK):  # a size the file does not keep (/proc, growing) is capped here
        chunks.append(chunk)
        size += len(chunk)
        if size > max_bytes:
            return Response(url, reason=TOO_LARGE, detail=f"{path[:200]}: over the {max_bytes}-byte limit")
        if _clock() > deadline:
            return Response(url, reason=TIMEOUT, detail=f"{path[:200]}: not read within the timeout")
    headers = Message()
    headers["Content-Type"] = mimetypes.guess_type(path)[0] or "application/octet-stream"
    return Response(url, 200, "OK", headers, b"".join(chunks))
