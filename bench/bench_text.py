"""Text stage throughput on one core: cnclip's normalization + filters vs OpenCC called per caption.

Target: >= 200k captions/s/core for the text stage's per-row work.
CNCLIP_BENCH_SMALL=1 (bench/sizes.py): 5,000 captions, one run of each.
"""

from __future__ import annotations

import os

os.environ["POLARS_MAX_THREADS"] = "1"  # per core: polars must not use the second core

import html
import random
import re
import time
import unicodedata

import polars as pl

from cnclip.corpus.ops.normalize import _opencc, normalize_captions
from cnclip.corpus.recipe import TextSettings
from cnclip.corpus.stages.text import load_blacklist, per_row_reason
from sizes import announce, size

COUNT = size(400_000, 5_000)
RUNS = size(3, 1)  # the fastest of RUNS is kept for the stage and baseline A
WORDS = ["一隻貓", "在沙發上", "睡覺", "２０２３年", "ＮＢＡ總決賽", "美丽的", "风景", "高清壁纸", "&amp;", "的照片",
         "a photo of", "dog", "點擊查看大圖", "IMG_2023", "北京", "上海", "夕陽下的", "海邊", "  ", "\u200b"]


def captions(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(WORDS) for _ in range(rng.randint(2, 6))) for _ in range(count)]


def best_of(runs: int, fn) -> float:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    raw = captions(COUNT)
    settings = TextSettings()
    blacklist = load_blacklist(settings)
    frame = pl.DataFrame({"url": ["http://127.0.0.1/x.jpg"] * COUNT, "caption_raw": raw})

    def cnclip_text() -> int:
        normalized = normalize_captions(frame["caption_raw"], settings.opencc_config)
        return frame.with_columns(normalized).select(per_row_reason(settings, blacklist)).height

    converter = _opencc("t2s")

    def opencc_loop() -> None:
        [converter.convert(c) for c in raw]

    han, letter = re.compile(r"[\u4e00-\u9fff]"), re.compile(r"[^\W\d_]")

    def python_loop() -> None:
        # The same steps written the usual way: one Python call chain per caption.
        for caption in raw:
            text = html.unescape(caption)
            text = unicodedata.normalize("NFKC", text)
            text = " ".join(text.split())
            text = converter.convert(text)
            letters = len(letter.findall(text))
            _ = (5 <= len(text) <= 50, letters and len(han.findall(text)) / letters >= 0.5,
                 any(p in text for p in blacklist))

    ours = best_of(RUNS, cnclip_text)
    per_caption_opencc = best_of(RUNS, opencc_loop)
    per_caption_all = best_of(1, python_loop)
    announce()
    print(f"text stage (normalize + filters), 1 core: {COUNT / ours:,.0f} captions/s "
          f"(target >= 200,000: {'met' if COUNT / ours >= 200_000 else 'NOT met'})")
    print(f"baseline A, Python loop calling OpenCC per caption, conversion only: {COUNT / per_caption_opencc:,.0f} "
          f"captions/s -> ratio {per_caption_opencc / ours:.2f}x (A does a fraction of the work)")
    print(f"baseline B, Python loop doing the same normalization + filters per caption: "
          f"{COUNT / per_caption_all:,.0f} captions/s -> ratio {per_caption_all / ours:.2f}x")


if __name__ == "__main__":
    main()
