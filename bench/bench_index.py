"""The search index at scale: `cnclip corpus index` over 1M random unit vectors, 512 wide, stored as
the embed stage stores them (float16 Parquet parts of 10,000 rows, one per shard, + model.json).

For each kind (flat: exact; ivf, hnsw: approximate) the build seconds (reading the parts
included, as `cnclip corpus index` runs), queries/s over 1,000 queries in one batch, and two
accuracies: recall@10 against the flat index of the same run for random unit queries (no row
is really near one: the worst case for an approximate index, whose cells mean nothing on
structureless data), and for "near" queries (stored rows plus noise, cosine ~0.9 to their row,
as a real query has a real match) how often that row is in the top 10. Baseline: flat, the
exact scan. Measured on 2 shared cores, 1 faiss thread: flat builds in 134 s and answers 10
queries/s; ivf (1,000 lists, nprobe 62) 382 s, 15-17 queries/s (1.6x; flat's scan is one BLAS
matrix product, ivf's 6% of the rows are scanned list by list), near-query hit rate 0.996,
random-query recall@10 0.18.

BENCH_INDEX_ROWS (default 1,000,000) and BENCH_INDEX_KINDS (default flat,ivf) change a run. hnsw
is not in the default: its build is single-threaded-slow here (make sets OMP_NUM_THREADS=1): at
100,000 rows it took 339 s against flat's 6 s and ivf's 65 s, for 1.8x flat's queries/s.
CNCLIP_BENCH_SMALL=1 (bench/sizes.py): 5,000 rows in parts of 1,000, 100 queries.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

from cnclip.corpus.manifests.schemas import PUBLISHED_EMBEDDINGS
from cnclip.embed import store
from cnclip.search import index as idx
from sizes import announce, size

ROWS = int(os.environ.get("BENCH_INDEX_ROWS", size(1_000_000, 5_000)))
KINDS = os.environ.get("BENCH_INDEX_KINDS", "flat,ivf").split(",")
WIDTH, TOP = 512, 10
PART_ROWS, QUERIES = size((10_000, 1_000), (1_000, 100))


def unit(rng, n: int) -> np.ndarray:
    vectors = rng.standard_normal((n, WIDTH), dtype=np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def write_corpus(manifest_dir: Path, rng) -> tuple[np.ndarray, np.ndarray]:
    """The parts; returns QUERIES stored rows and their row numbers, to make near queries from."""
    out = manifest_dir / "embeddings"
    kept, rows = [], []
    for shard, start in enumerate(range(0, ROWS, PART_ROWS)):
        n = min(PART_ROWS, ROWS - start)
        image = unit(rng, n)
        keys = [f"{i:09d}" for i in range(start, start + n)]
        frame = store.frame_of(np.arange(start, start + n), image, image, key=keys, clip_score=np.ones(n, np.float32))
        store.write_part(frame.select(list(PUBLISHED_EMBEDDINGS.columns)), out / f"{shard:05d}.parquet",
                         PUBLISHED_EMBEDDINGS)
        take = max(1, QUERIES * n // ROWS)
        kept.append(image[:take])
        rows.append(np.arange(start, start + take))
    store.write_model_record(out, "random", WIDTH)
    return np.concatenate(kept)[:QUERIES], np.concatenate(rows)[:QUERIES]


def recall(found: np.ndarray, exact: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / TOP for a, b in zip(found, exact, strict=True)]))


def main() -> None:
    rng = np.random.default_rng(0)
    announce()
    with tempfile.TemporaryDirectory() as tmp:
        manifest_dir = Path(tmp)
        started = time.perf_counter()
        stored, sources = write_corpus(manifest_dir, rng)
        print(f"{ROWS:,} rows x {WIDTH} (float16 parts of {PART_ROWS:,}) written in "
              f"{time.perf_counter() - started:.1f} s; faiss on {faiss.omp_get_max_threads()} threads")
        noisy = stored + 0.5 / np.sqrt(WIDTH) * rng.standard_normal(stored.shape, dtype=np.float32)
        queries = {"random": unit(rng, QUERIES),
                   "near": np.ascontiguousarray(noisy / np.linalg.norm(noisy, axis=1, keepdims=True))}
        exact = None
        rows = []
        for kind in KINDS:
            started = time.perf_counter()
            record = idx.build_index(manifest_dir, kind)
            build = time.perf_counter() - started
            loaded = idx.load_index(manifest_dir)
            figures = {"kind": kind, "build_s": build, "params": record["params"]}
            for name, batch in queries.items():
                started = time.perf_counter()
                _, labels = loaded.index.search(batch, TOP)
                figures[f"{name}_qps"] = QUERIES / (time.perf_counter() - started)
                if name == "near":
                    figures["near_hits"] = float(np.mean([s in f for s, f in zip(sources, labels, strict=True)]))
                elif kind == "flat":
                    exact = labels
                if name == "random":
                    figures["random_recall"] = recall(labels, exact) if exact is not None else float("nan")
            del loaded
            rows.append(figures)
            print(f"{kind:>5}: build {build:7.1f} s  random queries {figures['random_qps']:8.0f}/s recall@10 "
                  f"{figures['random_recall']:.3f}  near queries {figures['near_qps']:8.0f}/s own row in top 10 "
                  f"{figures['near_hits']:.3f}  {record['params']}", flush=True)
        flat = next((r for r in rows if r["kind"] == "flat"), None)
        for figures in rows:
            if flat is not None and figures is not flat:
                print(f"{figures['kind']} vs flat: build {figures['build_s'] / flat['build_s']:.1f}x the time, "
                      f"{figures['near_qps'] / flat['near_qps']:.1f}x the queries/s")
    sys.exit(0)


if __name__ == "__main__":
    main()
