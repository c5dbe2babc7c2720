"""A real S3-compatible server for the storage tests: moto's server mode on 127.0.0.1.

The fixtures point every AWS client of this process (and of the worker processes it spawns,
through the environment) at it: explicit dummy credentials, an explicit endpoint, instance
metadata and the user's ~/.aws files switched off, so nothing here can reach a real AWS address.
Import the fixtures into a test module: `from s3_server import loopback_only, s3, s3_bucket  # noqa: F401`;
a module-scoped fixture that talks to the server wraps its work in `refusing_non_loopback()`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import uuid

import pytest

from conftest import free_port

_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",  # botocore never asks 169.254.169.254 for credentials
    "AWS_CONFIG_FILE": os.devnull,  # the user's profiles and endpoints are not read
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
}


def _clear_s3_clients() -> None:
    """fsspec keeps one filesystem per set of arguments: one made before the endpoint was set
    (or for a previous server) must not be reused."""
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture(scope="session")
def s3():
    """The endpoint URL of a moto S3 server on 127.0.0.1, with this process's AWS settings aimed
    at it for the whole session (and restored after)."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one log line per request otherwise
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    with pytest.MonkeyPatch.context() as patch:
        for name in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_ENDPOINT_URL_S3"):
            patch.delenv(name, raising=False)
        for name, value in {**_ENV, "AWS_ENDPOINT_URL": endpoint}.items():
            patch.setenv(name, value)
        _clear_s3_clients()
        try:
            yield endpoint
        finally:
            _clear_s3_clients()
            server.stop()


_LOOPBACK = ("127.0.0.1", "::1")


@contextlib.contextmanager
def refusing_non_loopback():
    """Refuse (and record) every TCP connection this process opens to anything but loopback
    while the block runs; yields the list of refused attempts."""
    attempts: list = []
    connect, connect_ex = socket.socket.connect, socket.socket.connect_ex

    def refused(sock, address) -> bool:
        if sock.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in _LOOPBACK:
            attempts.append(address[:2])
            return True
        return False

    def guarded_connect(sock, address):
        if refused(sock, address):
            raise ConnectionRefusedError(f"test: no connection to {address[0]} (loopback only)")
        return connect(sock, address)

    def guarded_connect_ex(sock, address):
        return 111 if refused(sock, address) else connect_ex(sock, address)  # ECONNREFUSED

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(socket.socket, "connect", guarded_connect)
        patch.setattr(socket.socket, "connect_ex", guarded_connect_ex)
        yield attempts


@pytest.fixture
def loopback_only():
    """Refuse (and record) every TCP connection this process opens to anything but loopback, for
    the test's duration: a client that fell back to a real endpoint or to instance metadata
    (169.254.169.254) fails the test instead of leaving the machine."""
    with refusing_non_loopback() as attempts:
        yield attempts
    assert attempts == [], f"connections attempted outside loopback: {attempts}"


@pytest.fixture
def s3_bucket(s3, loopback_only):
    """A fresh, empty bucket on the test server (one per test, so tests never see each other's
    objects): its s3:// URL. Nothing but loopback is reachable meanwhile."""
    import s3fs

    name = f"cnclip-test-{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem().mkdir(name)
    return f"s3://{name}"
