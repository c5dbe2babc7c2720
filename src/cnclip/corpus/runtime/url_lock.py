"""One build at a time on a URL work_dir: a lock object that only one build can create.

An object store has no flock, and a lock there outlives the process that took it. The lock is
`<work_dir>/.cnclip-build.lock`, created only if absent: on S3 a conditional PUT
(`If-None-Match: *`), which the store decides atomically, so of two builds starting together
exactly one gets it. Its content names the holder (host, PID, a random token, the time it was
taken); after writing, the build reads it back and holds the lock only if the token is its own,
which also settles the race on a filesystem without conditional writes (there best effort: two
writers within one round trip may both see their own token if the store is not read-after-write
consistent). The holder removes the lock when the build ends, if it is still its own.

A build killed outright leaves its lock behind. A lock whose holder is a process of this host
that no longer runs is taken over; one held from another host stops the build with a one-line
message naming the holder and the object to remove once that build is known to be gone.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid

from cnclip.corpus.runtime import storage

LOCK = ".cnclip-build.lock"  # the name ownership.py gives the local lock file


def _read(path: str) -> dict:
    try:
        record = json.loads(storage.read_bytes(path))
    except (FileNotFoundError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _holder(record: dict) -> str:
    if not record:
        return "another process"
    return f"PID {record.get('pid')} on {record.get('host')}, since {record.get('since')}"


def _gone(record: dict) -> bool:
    """Whether the lock's holder is a process of this host that has ended (its lock is stale)."""
    if record.get("host") != socket.gethostname() or not isinstance(record.get("pid"), int):
        return False
    try:
        os.kill(record["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def _take(path: str, mine: dict) -> bool:
    """Create the lock if absent (taking over a stale one once); True when it is ours on re-read."""
    data = json.dumps(mine).encode()
    if not storage.create_exclusive(path, data):
        if not _gone(_read(path)):
            return False
        storage.remove(path)
        if not storage.create_exclusive(path, data):
            return False
    return _read(path).get("token") == mine["token"]


def url_lock_path(folder: str) -> str:
    return storage.join(folder, LOCK)


def take_url_lock(folder: str, path: str) -> str:
    """Create the lock object of URL `folder` as this process's; its token, or BuildLockedError."""
    from cnclip.corpus.runtime.ownership import BuildLockedError

    mine = {"tool": "cnclip", "host": socket.gethostname(), "pid": os.getpid(), "token": uuid.uuid4().hex,
            "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if not _take(path, mine):
        raise BuildLockedError(f"{folder}: another build ({_holder(_read(path))}) is running on this work_dir; "
                               f"wait for it to end (or remove {path} once it is gone)")
    return mine["token"]


def release_url_lock(path: str, token: str) -> None:
    """Remove the lock object if it is still ours (a holder taken over as stale must not remove
    the new holder's)."""
    if _read(path).get("token") == token:
        storage.remove(path)
