import os
import socket
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("CNCLIP_QUIET", "1")

from browser import browser  # noqa: E402, F401 (the session fixture, declared once for every module)
from cnclip.corpus.recipe import parse_recipe  # noqa: E402
from cnclip.corpus.sources.sample_web import SampleWebServer  # noqa: E402
from search_corpus import demo_corpus, demo_recipe, searchable_corpus  # noqa: E402, F401 (session fixtures)

REPO = Path(__file__).resolve().parents[1]


# Session fixtures that cost tens of seconds: under pytest-xdist's `--dist loadgroup` (what `make
# test` runs) the tests sharing one run on one worker, which makes it once. A Spark test that also
# reads the demo build goes with Spark: the session is the dearer of the two to start. The first
# test to ask for the demo build (and its trained model) makes it in its own setup, which counts
# against that test's timeout: those tests get 30 minutes, a hang still fails.
_DEMO_FIXTURES = frozenset({"demo_recipe", "demo_corpus", "searchable_corpus"})


# Builds of the golden demo serve the sample web on one fixed port (golden_demo.PORT: the recorded
# outputs' URLs contain it), so they must not overlap: they run on the Spark worker.
_GOLDEN_PORT_MODULES = frozenset({"test_golden_demo", "test_spark_build", "test_spark_published"})


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    for item in items:
        demo = bool(_DEMO_FIXTURES & set(getattr(item, "fixturenames", ())))
        module = getattr(getattr(item, "module", None), "__name__", "")
        if item.get_closest_marker("spark") or module.rpartition(".")[2] in _GOLDEN_PORT_MODULES:
            item.add_marker(pytest.mark.xdist_group("spark"))
        elif demo:
            item.add_marker(pytest.mark.xdist_group("demo"))
        if demo:
            item.add_marker(pytest.mark.timeout(1800))


def flip(value, bits):
    """A 64-bit hash with the given bits flipped: a near-duplicate at a known distance."""
    value = np.uint64(value)
    for bit in bits:
        value ^= np.uint64(1) << np.uint64(bit)
    return value


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def make_recipe(tmp_path):
    """A validated recipe writing under tmp_path; keyword sections override the defaults."""

    def make(sources, **sections):
        data = {
            "name": "test",
            "output_dir": str(tmp_path / "out"),
            "manifest_dir": str(tmp_path / "manifests"),
            "sources": sources,
            "download": {"processes": 1, "threads": 8, "timeout": 3, "retries": 0, "samples_per_part": 50,
                         # test servers live on loopback, which the network guard blocks by default
                         "allow_networks": ["127.0.0.1/32"], "per_host_delay": 0, "per_host_concurrency": 64},
            "image": {"size": 32, "min_side": 16},
            "shard": {"samples_per_shard": 20, "processes": 1},
            "text": {"processes": 1},
        }
        for key, value in sections.items():
            data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
        return parse_recipe(data, "test-recipe")

    return make


@pytest.fixture
def connections(monkeypatch):
    """Every address the code under test opens a TCP connection to."""
    opened = []
    original = socket.create_connection

    def spy(address, *args, **kwargs):
        opened.append(address[0])
        return original(address, *args, **kwargs)

    monkeypatch.setattr(socket, "create_connection", spy)
    return opened


@pytest.fixture
def web_root(tmp_path):
    root = tmp_path / "site"
    root.mkdir()
    return root


@pytest.fixture
def web(web_root):
    """A loopback server over web_root (files the test writes), with /slow/ and /noai/ routes."""
    with SampleWebServer(web_root, port=0) as server:
        yield server
