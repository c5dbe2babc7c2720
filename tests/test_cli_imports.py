"""`cnclip --help` and a mistyped recipe or config answer without loading torch, polars, numpy or numba.

Each case runs in a fresh interpreter: the test process itself has long imported all of them.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

HEAVY = ("torch", "polars", "numpy", "pyarrow", "PIL", "open_clip", "transformers", "img2dataset",
         "numba")

PROBE = """
import json, sys
from typer.testing import CliRunner
from cnclip.cli import app
result = CliRunner().invoke(app, sys.argv[1:])
print(json.dumps({"exit": result.exit_code, "output": result.output,
                  "loaded": sorted(m for m in %r if m in sys.modules)}))
""" % (HEAVY,)


def probe(*args: str, cwd=None) -> dict:
    done = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, cwd=cwd,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


@pytest.mark.parametrize("args", [["--help"], ["corpus", "--help"], ["train", "--help"], ["corpus", "build", "--help"],
                                  ["eval", "--help"], ["export", "--help"]], ids=" ".join)
def test_help_loads_no_heavy_module(args):
    result = probe(*args)
    assert result["exit"] == 0
    assert "Usage: " in result["output"]
    assert result["loaded"] == []


def test_a_bad_recipe_is_reported_before_any_heavy_import(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: r\noutput_dir: o\nmanifest_dir: m\n"
                      f"sources: [{{name: a, kind: metadata, path: {tmp_path}/missing.parquet}}]\n")
    result = probe("corpus", "build", str(recipe), cwd=tmp_path)
    assert result["exit"] == 2
    assert result["output"].strip() == f"error: {recipe}: sources[0].path: no such file '{tmp_path}/missing.parquet'"
    assert result["loaded"] == []


def test_a_bad_train_config_is_reported_before_torch_loads(tmp_path):
    config = tmp_path / "t.yaml"
    config.write_text("model: cn-tiny\nepochs: 1\n")
    result = probe("train", str(config), cwd=tmp_path)
    assert result["exit"] == 2
    lines = result["output"].splitlines()
    assert lines[0] == f"error: {config}: output_dir: Field required"
    assert f"{config}: epochs: unknown key" in lines
    assert result["loaded"] == []


def test_train_config_does_not_import_the_corpus_package():
    code = "import sys, cnclip.train.config; print(sorted(m for m in sys.modules if m.startswith('cnclip.corpus')))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert done.stdout.strip() == "[]"


def test_every_public_name_of_cnclip_train_resolves():
    """`cnclip.train`'s names load lazily from their modules: a name mapped to the wrong module
    would only fail when a user first reaches for it."""
    import importlib

    import cnclip.train as package

    folder = Path(package.__file__).parent
    for name in package.__all__:
        # A submodule of the same name would replace the lazy name once anything imports it.
        assert not (folder / f"{name}.py").exists() and not (folder / name).is_dir(), name
        value = getattr(package, name)
        assert callable(value) and value.__name__ == name, name
    assert package.load_model_from_checkpoint is importlib.import_module("cnclip.train.factory").load_model_from_checkpoint
