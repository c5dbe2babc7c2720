"""fsspec URLs as both halves meet them (a corpus read back from an object store, shards a trainer
streams): getting a URL's filesystem, or one line saying why it cannot be had.

fsspec loads a scheme's driver on first use (s3fs for s3://, gcsfs for gs://); a driver that is
not installed raises an ImportError whose text varies by driver, and an unknown scheme a
ValueError. Callers turn `filesystem_problem` into their own one-line error, so the user reads
which package to install instead of a traceback.
"""

from __future__ import annotations

from typing import Any


def scheme(url: str) -> str:
    return str(url).partition("://")[0]


def _driver_package(name: str) -> str | None:
    """The package that provides the fsspec driver of scheme `name` (gcsfs for gs), if fsspec knows it."""
    from fsspec.registry import known_implementations

    spec = known_implementations.get(name)
    return spec["class"].split(".", 1)[0] if spec else None


def filesystem_problem(url: str, err: Exception) -> str | None:
    """The one line for an error fsspec raised while making the filesystem of `url`, or None
    when the error is not about the filesystem itself (a missing object, say)."""
    name = scheme(url)
    if isinstance(err, ImportError):
        package = _driver_package(name) or err.name or "its fsspec driver"
        if package == "fsspec":  # a driver shipped with fsspec whose own dependency is missing (hdfs: pyarrow)
            return f"{url}: the {name}:// filesystem cannot load ({err})"
        return f"{url}: reading {name}:// URLs needs the {package} package (pip install {package})"
    if isinstance(err, ValueError) and "Protocol not known" in str(err):
        return f"{url}: no fsspec filesystem knows the scheme {name}:// (a typo, or a driver not installed)"
    return None


def url_filesystem(url: str, error: type[Exception]) -> tuple[Any, str]:
    """(fsspec filesystem, the URL's path on it); a missing driver or an unknown scheme raises
    `error` with one line naming the URL and, for a driver, the package to install. A driver that
    is installed but cannot start (hdfs without Java) is reported with its first line."""
    import fsspec

    try:
        return fsspec.core.url_to_fs(str(url))
    except (ImportError, ValueError) as err:
        problem = filesystem_problem(url, err)
        if problem is None:
            raise
        raise error(problem) from None
    except OSError as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise error(f"{url}: the {scheme(url)}:// filesystem cannot start ({first})") from None


def missing_bucket(fs: Any, path: str) -> str | None:
    """The bucket of `path` as a URL (s3://name) when the store says it does not exist (object
    stores name the bucket first in the path; filesystems with absolute paths have none), else None."""
    bucket = path.split("/", 1)[0]
    if not bucket or path.startswith("/") or bucket == path:
        return None
    try:
        return None if fs.exists(bucket) else fs.unstrip_protocol(bucket)
    except (OSError, ValueError):
        return None  # the store refused to say: callers fall back to naming the URL


def missing_location(fs: Any, url: str, path: str) -> str:
    """Why `url` (not found) is not there: its bucket does not exist, or nothing is at it."""
    bucket = missing_bucket(fs, path)
    return f"{url}: no such bucket ({bucket})" if bucket else f"{url}: not found"
