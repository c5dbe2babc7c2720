"""The demo web built today against the build recorded before the restructure (golden_demo.py):
byte-identical tars, the same manifest rows, the same funnel."""

import pytest

from cnclip.corpus import build, parse_recipe
from golden_demo import assert_funnel_matches, assert_rows_match, assert_tars_match, demo_recipe

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("golden")
    build(parse_recipe(demo_recipe(root)), show_funnel=False)
    return root


def test_tars_are_byte_identical(demo):
    assert_tars_match(demo)


@pytest.mark.parametrize("folder", ["samples", "rejected"])
def test_manifest_rows_are_the_same(demo, folder):
    assert_rows_match(demo, folder)


def test_funnel_is_the_same(demo):
    assert_funnel_matches(demo)
