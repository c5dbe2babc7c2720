"""The built-in sample web: a seeded little site of coloured-shape images with Chinese captions.

It exists so that `make demo` and the tests exercise the whole pipeline on a fresh machine with no
internet: every case the text and download stages handle appears here (Traditional, full-width,
entities, English, boilerplate, file names, repeated captions, duplicate rows, 404s, HTML pages,
truncated files, a decompression bomb, tiny and elongated images, X-Robots-Tag opt-outs and a
server that never answers, exact and near-duplicate copies). Each row carries its `case` so
tests can check exact outcomes.
"""

from __future__ import annotations

import io
import random
import struct
import threading
import zlib
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import polars as pl
from PIL import Image, ImageDraw

from cnclip._common.errors import CnclipError
from cnclip.corpus.ops.phash import gray32, phash_pixels

# (simplified, traditional, RGB)
COLORS = [
    ("红色", "紅色", (220, 40, 40)),
    ("绿色", "綠色", (40, 170, 60)),
    ("蓝色", "藍色", (40, 70, 220)),
    ("黄色", "黃色", (235, 205, 40)),
    ("紫色", "紫色", (140, 50, 180)),
    ("橙色", "橙色", (245, 140, 30)),
]
SHAPES = [("圆形", "圓形"), ("正方形", "正方形"), ("三角形", "三角形"), ("菱形", "菱形")]
ENGLISH = {"红色": "red", "绿色": "green", "蓝色": "blue", "黄色": "yellow", "紫色": "purple", "橙色": "orange"}
ENGLISH_SHAPES = {"圆形": "circle", "正方形": "square", "三角形": "triangle", "菱形": "diamond"}
REPEATED_CAPTION = "高清壁纸图片大全免费下载"
IMAGE_SIDE = 128
DISTINCT_BITS = 12  # pHash bits between any two generated pictures (dedup's default threshold is 4)


@dataclass(frozen=True)
class SampleRow:
    path: str
    caption: str
    case: str


def draw_shape(color: tuple[int, int, int], shape: str, rng: random.Random, side: int = IMAGE_SIDE) -> Image.Image:
    """One coloured shape on a pale, smoothly mottled background.

    The background is random 4x4 and 16x16 grids blown up smoothly: it gives every picture its own
    low-frequency structure, so distinct pictures have distinct perceptual hashes (plain
    backgrounds would make most same-coloured shapes near-duplicates of each other).
    """
    coarse = Image.frombytes("RGB", (4, 4), bytes(rng.randint(120, 250) for _ in range(48)))
    fine = Image.frombytes("RGB", (16, 16), bytes(rng.randint(120, 250) for _ in range(768)))
    image = Image.blend(coarse.resize((side, side), Image.Resampling.BICUBIC),
                        fine.resize((side, side), Image.Resampling.BICUBIC), 0.35)
    draw = ImageDraw.Draw(image)
    radius = rng.randint(side // 4, side // 3)
    margin = radius + side // 32
    cx = rng.randint(margin, side - margin)
    cy = rng.randint(margin, side - margin)
    if shape == "圆形":
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=color)
    elif shape == "正方形":
        draw.rectangle([cx - radius, cy - radius, cx + radius, cy + radius], fill=color)
    elif shape == "三角形":
        draw.polygon([(cx, cy - radius), (cx - radius, cy + radius), (cx + radius, cy + radius)], fill=color)
    else:
        draw.polygon([(cx, cy - radius), (cx + radius, cy), (cx, cy + radius), (cx - radius, cy)], fill=color)
    return image


def png_bomb(width: int = 20_000, height: int = 20_000) -> bytes:
    """A valid all-black greyscale PNG: ~400 MB of pixels in ~400 KB on the wire."""
    compressor = zlib.compressobj(9)
    row = b"\x00" * (width + 1)
    data = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()

    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


def _jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _shape_caption(rng: random.Random, simplified: str, shape: str) -> str:
    template = rng.choice(["一个{c}的{s}", "画着{c}{s}的图片", "浅色背景上的{c}{s}", "这是一个{c}{s}"])
    return template.format(c=simplified, s=shape)


def generate_site(root: Path, images: int = 300, seed: int = 0) -> list[SampleRow]:
    """Write the site under `root` and return its rows (the metadata a crawler would have found)."""
    rng = random.Random(seed)
    (root / "img").mkdir(parents=True, exist_ok=True)
    (root / "page").mkdir(parents=True, exist_ok=True)
    rows: list[SampleRow] = []

    def add_image(name: str, image: Image.Image) -> str:
        path = f"img/{name}.jpg"
        (root / path).write_bytes(_jpeg(image))
        return path

    taken: list[int] = []

    def distinct_shape(color: tuple[int, int, int], shape: str) -> Image.Image:
        # Redraw until the picture's pHash is far from every earlier one, so that only the
        # copies made on purpose below are near-duplicates.
        while True:
            image = draw_shape(color, shape, rng)
            digest = int(phash_pixels(gray32(_jpeg(image)))[0])
            if all(bin(digest ^ other).count("1") > DISTINCT_BITS for other in taken):
                taken.append(digest)
                return image

    # Most images are clean; a seeded share of them carry one of the text cases.
    text_cases = ["traditional"] * 8 + ["full_width"] * 5 + ["entities"] * 3 + ["english"] * 5
    text_cases += ["boilerplate"] * 3 + ["file_name"] * 3 + ["bare_url"] * 1 + ["too_short"] * 2 + ["too_long"] * 2
    every_case = ["plain"] * 6 + sorted(set(text_cases))
    for index in range(images):
        simplified, traditional, rgb = COLORS[rng.randrange(len(COLORS))]
        shape_s, shape_t = SHAPES[rng.randrange(len(SHAPES))]
        path = add_image(f"{index:05d}", distinct_shape(rgb, shape_s))
        roll = rng.randrange(100)
        case = text_cases[roll] if roll < len(text_cases) else "plain"
        if index < len(every_case):  # each case at least once, whatever the seed
            case = every_case[index]
        caption = _shape_caption(rng, simplified, shape_s)
        if case == "traditional":
            caption = f"一個{traditional}的{shape_t}"
        elif case == "full_width":
            caption = f"２０２３年　{caption}　ＨＤ"
        elif case == "entities":
            caption = f"{caption}&nbsp;&lt;高清&gt;"
        elif case == "english":
            caption = f"a {ENGLISH[simplified]} {ENGLISH_SHAPES[shape_s]} on a light background"
        elif case == "boilerplate":
            caption = f"{caption} 点击查看大图"
        elif case == "file_name":
            caption = rng.choice(["IMG_20230512_0931.jpg", "DSC00123.JPG", "微信图片_20230101120000.jpg"])
        elif case == "bare_url":
            caption = f"https://example.com/images/{index}.jpg"
        elif case == "too_short":
            caption = shape_s
        elif case == "too_long":
            caption = (caption + "，") * 12
        rows.append(SampleRow(path, caption, case))

    # A spam caption on 15 different images: over the demo's cap of 10, dropped everywhere.
    for index in range(15):
        simplified, _, rgb = COLORS[index % len(COLORS)]
        path = add_image(f"repeat-{index:02d}", distinct_shape(rgb, SHAPES[index % len(SHAPES)][0]))
        rows.append(SampleRow(path, REPEATED_CAPTION, "repeated_caption"))

    # The same (url, caption) listed twice: collapsed to the first.
    for index in range(5):
        simplified, _, rgb = COLORS[index % len(COLORS)]
        shape = SHAPES[(index + 1) % len(SHAPES)][0]
        path = add_image(f"dup-{index:02d}", distinct_shape(rgb, shape))
        caption = f"重复列出的{simplified}{shape}第{index}张"
        rows.append(SampleRow(path, caption, "duplicate_row_first"))
        rows.append(SampleRow(path, caption, "duplicate_row_again"))

    # Pictures already listed, again under other URLs and captions: byte-identical copies, and
    # copies re-encoded at quality 50 or scaled to 90%. Dedup keeps the first listing.
    originals = [r.path for r in rows if r.case == "plain"][:6]
    for index, original in enumerate(originals):
        data = (root / original).read_bytes()
        if index < 2:
            case, copy = "exact_copy", data
        else:
            image = Image.open(io.BytesIO(data))
            if index % 2:
                image = image.resize((IMAGE_SIDE * 9 // 10, IMAGE_SIDE * 9 // 10), Image.Resampling.LANCZOS)
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=50)
            case, copy = "near_copy", buffer.getvalue()
        path = f"img/copy-{index}.jpg"
        (root / path).write_bytes(copy)
        rows.append(SampleRow(path, f"别处转载的同一张图片第{index}号", case))

    good = "一张可以正常显示的{}号图片"
    for index in range(8):
        rows.append(SampleRow(f"img/missing-{index}.jpg", good.format(index), "missing_file"))
    for index in range(4):
        page = f"page/{index}.html"
        (root / page).write_text(f"<html><body><p>第{index}页</p></body></html>", encoding="utf-8")
        rows.append(SampleRow(page, good.format(100 + index), "html_page"))
    whole = _jpeg(draw_shape((10, 10, 10), "圆形", rng))
    for index in range(3):
        path = f"img/truncated-{index}.jpg"
        (root / path).write_bytes(whole[: 120 + 40 * index])
        rows.append(SampleRow(path, good.format(200 + index), "truncated"))
    (root / "img/bomb.png").write_bytes(png_bomb())
    rows.append(SampleRow("img/bomb.png", "一张看起来很小的巨大图片", "bomb"))
    for index in range(3):
        path = add_image(f"tiny-{index}", draw_shape((200, 30, 30), "圆形", rng, side=16))
        rows.append(SampleRow(path, good.format(300 + index), "tiny"))
    for index in range(2):
        path = f"img/elongated-{index}.jpg"
        (root / path).write_bytes(_jpeg(Image.new("RGB", (600, 80), (30, 120, 200))))
        rows.append(SampleRow(path, good.format(400 + index), "elongated"))
    for index in range(2):
        path = add_image(f"noai-{index}", draw_shape((30, 30, 200), "正方形", rng))
        rows.append(SampleRow("noai/" + path, good.format(500 + index), "no_ai"))
    rows.append(SampleRow("slow/img/00000.jpg", good.format(600), "never_answers"))
    return rows


def write_sample_web(root: Path, images: int = 300, seed: int = 0) -> Path:
    """Generate the site once (seeded, so identical every time) and its metadata Parquet."""
    metadata = root / f"metadata-{images}-{seed}.parquet"
    if not metadata.exists():
        rows = generate_site(root / "site", images=images, seed=seed)
        frame = pl.DataFrame(
            {"path": [r.path for r in rows], "caption": [r.caption for r in rows], "case": [r.case for r in rows]}
        )
        tmp = metadata.with_suffix(".tmp")
        frame.write_parquet(tmp)
        tmp.replace(metadata)
    return metadata


class _Handler(BaseHTTPRequestHandler):
    server: "SampleWebServer"
    content_types = {".jpg": "image/jpeg", ".png": "image/png", ".html": "text/html; charset=utf-8"}

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        path = self.path.split("?", 1)[0].lstrip("/")
        if path.startswith("slow/"):
            # Never answer: hold the connection until the client gives up or the server stops.
            self.server.stopping.wait(timeout=300)
            return
        headers = {}
        if path.startswith("noai/"):
            path = path.removeprefix("noai/")
            headers["X-Robots-Tag"] = "noai, noimageai"
        file = (self.server.root / path).resolve()
        if self.server.root not in file.parents or not file.is_file():
            self.send_error(404)
            return
        body = file.read_bytes()
        self.send_response(200)
        self.send_header("Content-Type", self.content_types.get(file.suffix, "application/octet-stream"))
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args) -> None:  # keep build output readable
        pass


class SampleWebError(CnclipError, OSError):
    """The sample web cannot listen on its port (in use, or not allowed)."""


class SampleWebServer(ThreadingHTTPServer):
    """Serves a folder on 127.0.0.1 in a background thread; use as a context manager."""

    daemon_threads = True

    def __init__(self, root: Path, port: int = 0):
        self.root = Path(root).resolve()
        self.stopping = threading.Event()
        try:
            super().__init__(("127.0.0.1", port), _Handler)
        except OSError as err:
            raise SampleWebError(f"sample web: cannot listen on 127.0.0.1:{port} ({err.strerror}); "
                          "set the source's `port` to a free one") from None
        self._thread = threading.Thread(target=self.serve_forever, name="sample-web", daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def __enter__(self) -> "SampleWebServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopping.set()
        self.shutdown()
        self.server_close()
