"""Shards and manifests on fsspec URLs (s3://, gs://...), for the data loader.

webdataset opens only the schemes its own table knows (pipe:, http(s) through curl, gs through
gsutil); a URL of any other scheme (and gs://, so that a missing gcsfs says so) is opened here
through fsspec, whose driver brings the credentials and endpoint from its usual settings
(AWS_* variables for s3fs). Reads stream: a tar is read front to back through the driver's
read-ahead buffer, a Parquet part only for the columns a query selects.
"""

from __future__ import annotations

import posixpath
from typing import IO, Any, Callable, Iterable, Iterator

from cnclip._common.urls import missing_bucket, missing_location, url_filesystem

# Streamed by webdataset's own openers (or, for pipe:, a shell command), never through fsspec.
_WEBDATASET_SCHEMES = ("pipe:", "http://", "https://")


def is_fsspec_url(name: str) -> bool:
    """Whether `name` is a URL this module opens (any scheme but file://, http(s) and pipe:)."""
    text = str(name)
    return "://" in text and not text.startswith(("file://", *_WEBDATASET_SCHEMES))


def filesystem(url: str, error: type[Exception]) -> tuple[Any, str]:
    fs, path = url_filesystem(url, error)
    fs.invalidate_cache()  # a listing kept from earlier in this process would hide shards added since
    return fs, path


def expand(pattern: str, error: type[Exception], origin: str) -> list[str]:
    """A URL glob's matches, or a plain URL that must exist; a bucket or object that is not there
    is a one-line `error` naming the URL."""
    fs, path = filesystem(pattern, error)
    if any(ch in path for ch in "*?["):
        found = sorted(fs.unstrip_protocol(name) for name in fs.glob(path))
        bucket = None if found else missing_bucket(fs, path)
        if bucket:
            raise error(f"{origin}: {pattern}: no such bucket ({bucket})")
        return found
    if not fs.isfile(path):
        bucket = missing_bucket(fs, path)
        raise error(f"{origin}: no such shard: {pattern}" + (f" (no such bucket {bucket})" if bucket else ""))
    return [pattern]


def read_text(url: str, error: type[Exception], origin: str) -> str:
    """A small file's text; one that is not there (or whose bucket is not) is a one-line `error`."""
    fs, path = filesystem(url, error)
    try:
        return fs.cat_file(path).decode("utf-8")
    except FileNotFoundError:
        raise error(f"{origin}: {missing_location(fs, url, path)}") from None


def is_file(url: str, error: type[Exception]) -> bool:
    fs, path = filesystem(url, error)
    return fs.isfile(path)


def parent(url: str) -> str:
    return posixpath.dirname(url.rstrip("/"))


def join(url: str, *names: str) -> str:
    return "/".join([url.rstrip("/"), *names])


def scan_parquet(urls: list[str], error: type[Exception]):
    """A lazy polars frame over Parquet parts at URLs (a pyarrow dataset per part over the fsspec
    filesystem; columns missing from a part are null)."""
    import polars as pl
    import pyarrow.dataset as ds

    fs, _ = filesystem(urls[0], error)
    frames = [pl.scan_pyarrow_dataset(ds.dataset(fs._strip_protocol(url), filesystem=fs, format="parquet"))
              for url in urls]
    return frames[0] if len(frames) == 1 else pl.concat(frames, how="diagonal_relaxed")


def open_shard(url: str) -> IO[bytes]:
    import fsspec

    return fsspec.open(url, "rb").open()


def open_streams(src: Iterable[dict], handler: Callable[[Exception], bool]) -> Iterator[dict]:
    """webdataset's url_opener, with fsspec URLs opened through fsspec: each sample gets its
    `stream`, closed once the next is asked for (the tar reader is done with it by then). An
    error opening one goes to `handler`, as webdataset's opener does."""
    from webdataset.gopen import gopen

    for sample in src:
        url = sample["url"]
        try:
            stream = open_shard(url) if is_fsspec_url(url) else gopen(url)
        except Exception as exn:  # noqa: BLE001 - handed to the caller's handler, as webdataset does
            exn.args = (*exn.args, url)
            if handler(exn):
                continue
            break
        try:
            yield {**sample, "stream": stream}
        finally:
            stream.close()
