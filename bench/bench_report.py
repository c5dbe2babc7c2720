"""Corpus report over a 1M-row build: samples/ + rejected/ manifests, funnel.json and a few small
shards (tests/synthetic_corpus.py writes them by polars expressions).

Target: <= 30 s here. Printed: the report's seconds, its ratio to the 30 s target, and its
ratio to a baseline measured in the same run: one plain polars scan that reads every column the
report aggregates (what any report over these manifests must at least read).
CNCLIP_BENCH_SMALL=1 (bench/sizes.py): 8,000 + 2,000 rows in 8 parts.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from cnclip.report.corpus import write_corpus_report  # noqa: E402
from sizes import announce, size  # noqa: E402
from synthetic_corpus import write_synthetic_corpus  # noqa: E402

SAMPLES, REJECTED, PARTS = size((800_000, 200_000, 80), (8_000, 2_000, 8))
TARGET_S = 30.0


def baseline(manifest_dir: Path) -> float:
    started = time.perf_counter()
    pl.scan_parquet(sorted((manifest_dir / "samples").glob("*.parquet"))).select(
        "key", "shard", "source", "caption", "width", "height", "original_width", "original_height").collect()
    pl.scan_parquet(sorted((manifest_dir / "rejected").glob("*.parquet"))).select(
        "uid", "stage", "reason", "source", "url", "caption_raw", "caption", "detail", "duplicate_of").collect()
    return time.perf_counter() - started


def main() -> None:
    announce()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        started = time.perf_counter()
        manifests = write_synthetic_corpus(root, samples=SAMPLES, rejected=REJECTED, per_shard=1000, tar_shards=3,
                                           parts=PARTS, work=True)
        print(f"synthetic corpus: {SAMPLES + REJECTED:,} rows written in {time.perf_counter() - started:.1f} s")
        base = baseline(manifests)
        started = time.perf_counter()
        out = write_corpus_report(manifests)
        seconds = time.perf_counter() - started
        size = out.stat().st_size
        print(f"corpus report: {seconds:.2f} s for {SAMPLES + REJECTED:,} rows ({size / 1e6:.1f} MB page); "
              f"{seconds / TARGET_S:.2f} x the {TARGET_S:.0f} s target; {seconds / base:.1f} x the plain scan "
              f"of its columns ({base:.2f} s)")
        if seconds > TARGET_S:
            sys.exit(f"corpus report took {seconds:.1f} s > {TARGET_S:.0f} s")


if __name__ == "__main__":
    main()
