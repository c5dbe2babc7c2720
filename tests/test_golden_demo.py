"""The demo web built today against the build recorded before the restructure (golden_demo.py):
byte-identical tars, the same manifest rows, the same funnel."""

import json

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from cnclip.corpus import build, parse_recipe
from golden_demo import GOLDEN, demo_recipe, funnel, manifest_rows, tar_digests

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("golden")
    build(parse_recipe(demo_recipe(root)), show_funnel=False)
    return root


def test_tars_are_byte_identical(demo):
    recorded = json.loads((GOLDEN / "tars.json").read_text())
    assert len(recorded) == 3
    assert tar_digests(demo / "out" / "shards") == recorded


@pytest.mark.parametrize("folder", ["samples", "rejected"])
def test_manifest_rows_are_the_same(demo, folder):
    recorded = pl.read_parquet(GOLDEN / f"{folder}.parquet")
    assert recorded.height > 0
    assert_frame_equal(manifest_rows(demo / "manifests", folder), recorded)


def test_funnel_is_the_same(demo):
    assert funnel(demo / "manifests") == json.loads((GOLDEN / "funnel.json").read_text(encoding="utf-8"))
