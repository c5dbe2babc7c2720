import json
import subprocess
import sys

from cnclip.corpus.download import img2dataset_arguments
from cnclip.corpus.sample_web import png_bomb

# Runs img2dataset's own resizer on a bomb in a fresh process, with and without the pixel limit
# the download stage hands to OpenCV, and reports the peak memory of each.
PROBE = r"""
import io, json, os, resource, sys
if sys.argv[2] == "guarded":
    os.environ["OPENCV_IO_MAX_IMAGE_PIXELS"] = "89478485"
from img2dataset.resizer import Resizer, ResizeMode
resizer = Resizer(image_size=64, resize_mode=ResizeMode.center_crop, resize_only_if_bigger=False,
                  min_image_size=64, max_image_area=89478485.0, max_aspect_ratio=3.0)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
with open(sys.argv[1], "rb") as f:
    result = resizer(io.BytesIO(f.read()))
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"error": result[-1], "grew_mib": (after - before) / 1024}))
"""


def probe(path, mode):
    out = subprocess.run([sys.executable, "-c", PROBE, str(path), mode], capture_output=True, text=True,
                         env={"NO_ALBUMENTATIONS_UPDATE": "1", "PATH": "/usr/bin:/bin"}, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_decompression_bomb_is_refused_from_its_header(tmp_path):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_bomb(20_000, 20_000))
    assert bomb.stat().st_size < 1_000_000
    guarded = probe(bomb, "guarded")
    assert "CV_IO_MAX_IMAGE_PIXELS" in guarded["error"]
    assert guarded["grew_mib"] < 50
    # Without the guard img2dataset decodes all 400M pixels before its own area check.
    unguarded = probe(bomb, "plain")
    assert unguarded["error"] == "image area too large"
    assert unguarded["grew_mib"] > 200  # ~380 MiB of pixels; ru_maxrss deltas vary with the allocator


def test_recipe_maps_onto_img2dataset(make_recipe, tmp_path):
    recipe = make_recipe([{"name": "m", "kind": "metadata", "path": "x-*.parquet"}],
                         image={"size": 96, "max_pixels": 1000, "max_aspect_ratio": 2.5, "min_side": 20},
                         download={"timeout": 7, "retries": 2, "processes": 3, "threads": 5})
    args = img2dataset_arguments(recipe)
    assert (args["image_size"], args["max_image_area"], args["max_aspect_ratio"], args["min_image_size"]) == (
        96, 1000.0, 2.5, 20)
    assert (args["timeout"], args["retries"], args["processes_count"], args["thread_count"]) == (7, 2, 3, 5)
    assert args["output_format"] == "webdataset" and args["save_additional_columns"] == ["uid"]
    assert args["disallowed_header_directives"] == ["noai", "noimageai", "noindex", "noimageindex"]
    assert args["output_folder"] == str(tmp_path / "out/work/download")
