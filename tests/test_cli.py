import subprocess
import sys

import pytest
from typer.testing import CliRunner

from cnclip.cli import app

runner = CliRunner()
COMMANDS = [["corpus", c] for c in ("build", "text", "download", "dedup", "shard", "stats", "verify", "hash-eval",
                                      "export-cn-clip")]
COMMANDS += [["train"], ["eval"], ["export"]]


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_every_command_help_shows_an_example(command):
    result = runner.invoke(app, [*command, "--help"])
    assert result.exit_code == 0
    assert f"Example: cnclip {' '.join(command)} " in result.output


def test_bad_recipe_is_one_line_and_exit_2(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("name: x\noutput_dir: o\nmanifest_dir: m\nsources: []\ntext: {max_chars: -1}\n")
    result = subprocess.run([sys.executable, "-m", "cnclip.cli", "corpus", "build", str(recipe)],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[0] == f"error: {recipe}: sources: List should have at least 1 item after validation, not 0 (got [])"
    assert lines[1] == f"{recipe}: text.max_chars: Input should be greater than or equal to 1 (got -1)"
    assert not (tmp_path / "o").exists()


def test_text_then_stats_from_the_cli(tmp_path):
    import polars as pl

    pl.DataFrame({"url": ["http://127.0.0.1/a.jpg", "http://127.0.0.1/b.jpg"],
                  "caption": ["一只猫在沙发上睡觉", "cat"]}).write_parquet(tmp_path / "m.parquet")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: r\noutput_dir: {tmp_path}/o\nmanifest_dir: {tmp_path}/m\n"
                      f"sources:\n  - {{name: m, kind: metadata, path: {tmp_path}/m.parquet}}\n"
                      "text: {processes: 1}\n")
    result = runner.invoke(app, ["corpus", "text", str(recipe)])
    assert result.exit_code == 0, result.output
    accepted = pl.read_parquet(tmp_path / "o/work/text/accepted/*.parquet")
    assert accepted["caption"].to_list() == ["一只猫在沙发上睡觉"]
    missing = runner.invoke(app, ["corpus", "stats", str(tmp_path / "nowhere")])
    assert missing.exit_code == 2 and "no samples/ or rejected/ manifests" in missing.output
