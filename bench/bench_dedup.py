"""Near-duplicate dedup at scale: 1M and 10M synthetic rows (uniform random 64-bit pHashes, 1% of
rows planted as copies of earlier rows with 1-4 bits flipped), d = 4.

Each size runs in its own process (so its peak memory is its own), REPEATS times; the medians are
printed, wall-clock and CPU seconds (CPU time is what load from other work changes least). Each
process first calls the dedup once on 1,000 rows: that call loads the compiled loops (numba),
a fixed cost per process that is printed on its own. Baseline,
measured in the same run: all-pairs comparison (numpy, vectorized) on 20k rows, extrapolated
quadratically. Targets: 10M rows in <= 10 s, time growing <= 12x from 1M to 10M rows, <= 2 GiB
peak, recall 100% of the planted pairs.

The growth is also set against a floor computed here (`banding_floor`): the least cost any exact
band search can have at each size, whatever its plan, grows ×13.7 from 1M to 10M rows in the cost
model, so a band search at its best at both sizes cannot grow by 12× or less.

CNCLIP_BENCH_SMALL=1 (bench/sizes.py): 20k and 50k rows, 1 run each, a 2,000-row baseline.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from math import comb
from statistics import median

import numpy as np

from cnclip.corpus.ops.neardup import _CANDIDATE_COST, _SORT_COST, BITS, band_plan
from sizes import announce, size

MAX_DISTANCE = 4
SIZES = size((1_000_000, 10_000_000), (20_000, 50_000))  # the rows of the two timed sizes
REPEATS = size(3, 1)
BASE_ROWS = size(20_000, 2_000)  # the all-pairs baseline's rows, extrapolated quadratically


def synthetic(count: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    hashes = rng.integers(0, 2**64 - 1, count, dtype=np.uint64, endpoint=True)
    planted = count // 100
    sources = rng.choice(count // 2, planted, replace=False)               # first half...
    copies = count // 2 + rng.choice(count - count // 2, planted, replace=False)  # ...copied into the second
    flips = np.zeros(planted, dtype=np.uint64)
    bits = rng.integers(1, MAX_DISTANCE + 1, planted)
    for k in range(MAX_DISTANCE):
        position = rng.integers(0, 64, planted).astype(np.uint64)
        flips |= np.where(k < bits, np.uint64(1) << position, np.uint64(0))
    hashes[copies] = hashes[sources] ^ flips
    return hashes, sources, copies


def run_size(count: int) -> dict:
    from cnclip.corpus.ops.dedup import near_duplicates

    # The first call in a process loads the compiled band loops from numba's cache (and, on a
    # machine's first run, compiles them): a fixed cost per process, timed on its own, so that it
    # neither hides in the 1M figure (flattering the growth) nor goes unreported.
    started = time.perf_counter()
    near_duplicates(np.arange(1000, dtype=np.int64), synthetic(1000, seed=2)[0], MAX_DISTANCE)
    first_call = time.perf_counter() - started
    hashes, sources, copies = synthetic(count)
    uids = np.arange(count, dtype=np.int64)
    started, cpu_started = time.perf_counter(), time.process_time()
    dropped = near_duplicates(uids, hashes, MAX_DISTANCE)
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    dropped_uids = set(dropped["uid"].to_list())
    # A planted pair is found when its later row is dropped as a duplicate of its group.
    recall = float(np.mean([c in dropped_uids for c in copies.tolist()]))
    peak = peak_mib()
    return {"rows": count, "seconds": seconds, "cpu": cpu, "peak_mib": peak, "recall": recall,
            "dropped": len(dropped_uids), "first_call": first_call}


def peak_mib() -> float:
    """This process's peak resident memory. VmHWM starts afresh at exec; ru_maxrss keeps the peak
    of the forked parent (here the all-pairs baseline, ~400 MiB), which hid the smaller runs'."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def brute_force_seconds(count: int = 20_000) -> float:
    hashes, _, _ = synthetic(count, seed=1)
    started = time.perf_counter()
    for start in range(0, count, 2000):
        block = hashes[start : start + 2000]
        np.nonzero(np.bitwise_count(block[:, None] ^ hashes[None, :]) <= MAX_DISTANCE)
    return time.perf_counter() - started


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--rows":
        print(json.dumps(run_size(int(sys.argv[2]))))
        return
    announce()
    base_rows = BASE_ROWS
    base = brute_force_seconds(base_rows)
    print(f"baseline: all-pairs on {base_rows:,} rows in {base:.2f} s")
    results = []
    for rows in SIZES:
        runs = [run_in_process(rows) for _ in range(REPEATS)]
        result = {"rows": rows, "seconds": median(r["seconds"] for r in runs), "cpu": median(r["cpu"] for r in runs),
                  "peak_mib": max(r["peak_mib"] for r in runs), "recall": min(r["recall"] for r in runs),
                  "spread": (min(r["seconds"] for r in runs), max(r["seconds"] for r in runs)),
                  "first_call": median(r["first_call"] for r in runs)}
        results.append(result)
        all_pairs = base * (rows / base_rows) ** 2
        low, high = result["spread"]
        print(f"{rows:>11,} rows: {result['seconds']:6.2f} s (runs {low:.2f}-{high:.2f}, "
              f"CPU {result['cpu']:.2f} s), peak {result['peak_mib']:,.0f} MiB, recall {result['recall']:.2%} of "
              f"planted pairs; all-pairs would take ~{all_pairs / 3600:,.1f} h "
              f"-> ratio {all_pairs / result['seconds']:,.0f}x; first call in the process (numba's "
              f"cache load, 1,000 rows) {result['first_call']:.2f} s, not counted")
    small, large = results
    (few, many), scale = SIZES, SIZES[1] / SIZES[0]
    growth = large["seconds"] / small["seconds"]
    print(f"{_short(few)} -> {_short(many)}: rows x{scale:g}, time x{growth:.1f} "
          f"(CPU x{large['cpu'] / small['cpu']:.1f}), "
          f"memory x{large['peak_mib'] / small['peak_mib']:.1f} (more rows need longer band keys: "
          f"{len(band_plan(few, MAX_DISTANCE).bands)} -> {len(band_plan(many, MAX_DISTANCE).bands)} bands)")
    small_plan, large_plan = (band_plan(rows, MAX_DISTANCE).cost(rows, rows * rows / 2) / rows for rows in SIZES)
    print(f"the least cost of any exact band search (fractional covering, neardup's cost model) grows "
          f"x{scale * banding_floor(many) / banding_floor(few):.1f} from {_short(few)} to {_short(many)} rows; "
          f"the plans chosen x{scale * large_plan / small_plan:.1f} in the same model; the rest of the measured "
          f"growth is memory")
    ok = (large["seconds"] <= 10 and growth <= 12 and large["peak_mib"] <= 2048
          and all(r["recall"] == 1.0 for r in results))
    print(f"targets (10M <= 10 s, growth <= 12x, <= 2 GiB, recall 100%): {'met' if ok else 'NOT met'}")


def _short(rows: int) -> str:
    """1M, 10M, 20k: the sizes as the printed lines have always named them."""
    return f"{rows // 10**6}M" if rows % 10**6 == 0 else f"{rows // 1000}k"


def banding_floor(count: int, max_distance: int = MAX_DISTANCE) -> float:
    """The least cost per row (neardup's cost model) of any exact band search over `count` uniform
    hashes: every band an exact key on some b bits, together avoiding every set of d differing bits.

    A random set of d of the 64 bits avoids a band of b bits with probability C(64-b, d) / C(64, d),
    so a complete plan's bands have probabilities summing to at least 1, and its cost is at least
    that of the band width with the lowest cost per unit of probability (a fractional covering:
    a lower bound no real plan, whose bands overlap, reaches)."""
    pairs = count * count / 2
    return min((_SORT_COST + pairs / count * 2.0 ** -b * _CANDIDATE_COST) * comb(BITS, max_distance)
               / comb(BITS - b, max_distance) for b in range(1, BITS - max_distance + 1))


def run_in_process(rows: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--rows", str(rows)], capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
