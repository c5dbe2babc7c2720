"""Every benchmark in bench/ runs to its end in small mode (CNCLIP_BENCH_SMALL=1) and prints its
ratio to its baseline: nothing else runs them, so an API rename, a moved module or a changed
recipe key would otherwise break `make bench` unseen. The figures are not checked (tiny inputs
on a shared machine say nothing about speed), only that each is a real positive number.
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"


def _load_sizes():
    """bench/sizes.py by its path: bench/ is not a package, and putting it on sys.path for the
    whole session could let its module names shadow others."""
    spec = importlib.util.spec_from_file_location("bench_sizes", BENCH / "sizes.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


sizes = _load_sizes()
pytestmark = pytest.mark.bench_smoke

NUMBER = r"([0-9][0-9,]*(?:\.[0-9]+)?)"

# benchmark: (the pattern of its ratio/baseline line with the ratio as group 1, how many such
# lines it prints, the pattern of its targets line or None where it states no target).
RATIOS = {
    "dedup": (rf"rows: .* -> ratio {NUMBER}x", 2, r"^targets \(.*\): (met|NOT met)$"),
    "download": (rf"^ratio: {NUMBER}x the raw time", 1, r"\(target <= 1\.05x: (met|NOT met)\)$"),
    "embed": (rf"^ratio: {NUMBER}x \(target", 1, r"\(target >= 1\.0x: (met|NOT met)\)$"),
    "hash": (rf"^ratio: {NUMBER}x \(target", 1, r"\(target >= 3x: (met|NOT met)\)$"),
    "index": (rf"^ivf vs flat: build {NUMBER}x the time, [0-9.]+x the queries/s$", 1, None),
    "report": (rf" x the 30 s target; {NUMBER} x the plain scan of its columns", 1, r"[0-9.]+ x the 30 s target"),
    "spark": (rf"; Spark/local {NUMBER}x$", 3, None),
    "text": (rf"-> ratio {NUMBER}x", 2, r"\(target >= 200,000: (met|NOT met)\)$"),
    "train": (rf"\| ratio {NUMBER}x  \(medians of 1\)$", 2, None),
}
CASES = [pytest.param(name, marks=pytest.mark.spark) if name == "spark" else name for name in sorted(RATIOS)]


def run_small(name: str) -> subprocess.CompletedProcess:
    """bench/bench_NAME.py in small mode, in a fresh interpreter as `make bench` runs it; size
    overrides from the caller's environment are dropped so the run is the small mode's."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(("BENCH_", "CNCLIP_BENCH_"))}
    env |= {"CNCLIP_BENCH_SMALL": "1", "OMP_NUM_THREADS": "1", "NO_ALBUMENTATIONS_UPDATE": "1"}
    return subprocess.run([sys.executable, str(BENCH / f"bench_{name}.py")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def test_every_benchmark_is_covered():
    assert sorted(p.stem.removeprefix("bench_") for p in BENCH.glob("bench_*.py")) == sorted(RATIOS)


@pytest.mark.parametrize("name", CASES)
def test_benchmark_runs_in_small_mode(name):
    result = run_small(name)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"bench_{name}.py exited {result.returncode}:\n{output[-4000:]}"
    lines = result.stdout.splitlines()
    assert sizes.NOTE in lines, result.stdout
    pattern, count, target = RATIOS[name]
    ratios = [float(m.group(1).replace(",", "")) for line in lines if (m := re.search(pattern, line))]
    assert len(ratios) == count, f"expected {count} ratio lines:\n{result.stdout}"
    assert all(math.isfinite(r) and r > 0 for r in ratios), ratios
    if target is not None:
        assert any(re.search(target, line) for line in lines), result.stdout


def test_small_mode_only_when_asked(monkeypatch):
    monkeypatch.delenv("CNCLIP_BENCH_SMALL", raising=False)
    assert not sizes.small() and sizes.size(1_000_000, 5) == 1_000_000
    for value in ("", "0", "yes"):
        monkeypatch.setenv("CNCLIP_BENCH_SMALL", value)
        assert sizes.size(1_000_000, 5) == 1_000_000, value
    monkeypatch.setenv("CNCLIP_BENCH_SMALL", "1")
    assert sizes.small() and sizes.size(1_000_000, 5) == 5
