"""How much memory the download stage may take, and the threads that fit `download.memory_budget`.

Where the bytes go (measured on img2dataset 1.47 with its OpenCV resizer):
- each worker process starts at about 650 MiB (img2dataset imports albumentations, which
  imports torch), counted as WORKER_BASE_BYTES;
- each process decodes one image at a time (its threads only fetch; the resize runs in the
  process's own loop), and the worst image within `image.max_pixels` costs about 80 bytes per
  pixel: a 16-bit RGBA PNG, which img2dataset alpha-mattes in float64 (JPEG: about 6);
- each thread holds up to 2 bodies of `max_response_bytes` (img2dataset lets 2 × threads fetched
  images wait for the resizer), and the guard holds one more per request in flight while it
  reads and joins it.

So the documented figure is
    processes × (WORKER_BASE_BYTES + image.max_pixels × DECODE_BYTES_PER_PIXEL
                 + threads × BODY_COPIES_PER_THREAD × max_response_bytes)
and a budget below it lowers `threads`, or refuses the recipe when one thread per process is
already too much.
"""

from __future__ import annotations

from typing import Optional

MiB = 1024 * 1024
WORKER_BASE_BYTES = 768 * MiB
DECODE_BYTES_PER_PIXEL = 88  # 80 measured for a 16-bit RGBA PNG, plus a tenth
BODY_COPIES_PER_THREAD = 4  # 2 waiting in the worker, the guard's read chunks and its joined copy


def _process_fixed_bytes(max_pixels: int) -> int:
    return WORKER_BASE_BYTES + max_pixels * DECODE_BYTES_PER_PIXEL


def _thread_bytes(max_response_bytes: int) -> int:
    return BODY_COPIES_PER_THREAD * max_response_bytes


def download_memory(processes: int, threads: int, max_pixels: int, max_response_bytes: int) -> int:
    """The most bytes a download with these settings is expected to hold (see the module doc)."""
    return processes * (_process_fixed_bytes(max_pixels) + threads * _thread_bytes(max_response_bytes))


def show_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count} B"  # not reached


def threads_within_budget(processes: int, threads: int, max_pixels: int, max_response_bytes: int,
                          budget: Optional[int]) -> tuple[int, Optional[str]]:
    """(threads to run, a message when lowered); ValueError naming the figure when even one
    thread per process is over the budget. No budget: the recipe's threads as they are."""
    if budget is None:
        return threads, None
    if budget <= 0:
        raise ValueError("download.memory_budget must be positive")
    needed = download_memory(processes, threads, max_pixels, max_response_bytes)
    if needed <= budget:
        return threads, None
    minimum = download_memory(processes, 1, max_pixels, max_response_bytes)
    if minimum > budget:
        raise ValueError(
            f"download.memory_budget {show_bytes(budget)} is below what {processes} process(es) of one thread "
            f"need: {show_bytes(minimum)} (each {show_bytes(WORKER_BASE_BYTES)} + image.max_pixels {max_pixels} "
            f"x {DECODE_BYTES_PER_PIXEL} B + {BODY_COPIES_PER_THREAD} x max_response_bytes); lower "
            f"image.max_pixels or download.processes, or raise the budget")
    fitting = (budget // processes - _process_fixed_bytes(max_pixels)) // _thread_bytes(max_response_bytes)
    fitting = max(1, min(threads, int(fitting)))
    message = (f"download: {threads} threads per process would need {show_bytes(needed)}, over "
               f"download.memory_budget {show_bytes(budget)}; running {fitting} threads "
               f"({show_bytes(download_memory(processes, fitting, max_pixels, max_response_bytes))})")
    return fitting, message
