"""The demo web's build recorded before a restructure, and the comparison a rebuild must pass.

`python tests/golden_demo.py` rewrites tests/data/golden-demo/ from a build of recipes/demo.yaml
(only its folders and its port changed: URLs, and so the tars' JSON members, contain the port).
Record again only when a change of output is intended, and say why in the commit.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

import polars as pl
import yaml

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "data" / "golden-demo"
PORT = 18799  # fixed: the URLs in every manifest row and tar member contain it


def demo_recipe(root: Path) -> dict:
    recipe = yaml.safe_load((ROOT / "recipes" / "demo.yaml").read_text(encoding="utf-8"))
    recipe["output_dir"], recipe["manifest_dir"] = str(root / "out"), str(root / "manifests")
    recipe["sources"][0]["port"] = PORT
    return recipe


def tar_digests(shards_dir: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(shards_dir.glob("*.tar"))}


def manifest_rows(manifest_dir: Path, folder: str) -> pl.DataFrame:
    """Every row of one manifest folder, in a stable order (files concatenated by name)."""
    parts = [pl.read_parquet(p) for p in sorted((manifest_dir / folder).glob("*.parquet"))]
    frame = pl.concat(parts, how="diagonal_relaxed")
    return frame.sort(frame.columns[:2], nulls_last=True)


def funnel(manifest_dir: Path) -> dict:
    recorded = json.loads((manifest_dir / "funnel.json").read_text(encoding="utf-8"))
    recorded.pop("shards_dir", None)  # where this build happened to write
    return recorded


def assert_tars_match(root: Path) -> None:
    """The build's tars are the recorded ones, byte for byte."""
    recorded = json.loads((GOLDEN / "tars.json").read_text())
    assert len(recorded) == 3
    assert tar_digests(root / "out" / "shards") == recorded


def assert_rows_match(root: Path, folder: str) -> None:
    """One manifest folder holds the recorded rows (and at least one)."""
    from polars.testing import assert_frame_equal

    recorded = pl.read_parquet(GOLDEN / f"{folder}.parquet")
    assert recorded.height > 0
    assert_frame_equal(manifest_rows(root / "manifests", folder), recorded)


def assert_funnel_matches(root: Path) -> None:
    recorded = json.loads((GOLDEN / "funnel.json").read_text(encoding="utf-8"))
    assert recorded["stages"][3]["rejected"]  # dedup dropped rows: the comparison covers its decisions
    assert funnel(root / "manifests") == recorded


def record(root: Path) -> None:
    from cnclip.corpus import build, parse_recipe

    shutil.rmtree(root, ignore_errors=True)
    build(parse_recipe(demo_recipe(root)), show_funnel=False)
    GOLDEN.mkdir(parents=True, exist_ok=True)
    manifests = root / "manifests"
    (GOLDEN / "tars.json").write_text(json.dumps(tar_digests(root / "out" / "shards"), indent=1) + "\n")
    (GOLDEN / "funnel.json").write_text(json.dumps(funnel(manifests), indent=1, ensure_ascii=False) + "\n")
    for folder in ("samples", "rejected"):
        manifest_rows(manifests, folder).write_parquet(GOLDEN / f"{folder}.parquet")


if __name__ == "__main__":
    if "cnclip" not in sys.modules:
        sys.path.insert(0, str(ROOT))
    record(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("/tmp/cnclip-golden-demo"))
