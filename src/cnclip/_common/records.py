"""The build's JSON records (funnel.json, checksums.json) read with one-line errors."""

from __future__ import annotations

import json
from typing import Callable


def read_record(path, read_text: Callable[[object], str], error: type[Exception], missing: str, key: str,
                kind: type, what: str) -> dict:
    """The JSON object at `path` whose `key` is a `kind`; else `error` naming the path and the
    problem: `missing` when there is no file, unreadable, or not `what`."""
    try:
        record = json.loads(read_text(path))
    except FileNotFoundError:
        raise error(f"{path}: {missing}") from None
    except (OSError, ValueError) as err:
        raise error(f"{path}: unreadable ({err})") from None
    if not isinstance(record, dict) or not isinstance(record.get(key), kind):
        raise error(f"{path}: not {what} (no {key!r} {'list' if kind is list else 'mapping'})")
    return record
