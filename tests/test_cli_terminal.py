"""What the terminal shows: `--version`, `-h`, and the results on stdout (diagnostics on stderr)."""

import importlib.metadata
import subprocess
import sys

import pytest


def cnclip(*args: str, cwd=None) -> subprocess.CompletedProcess:
    """The console script as a user runs it: a fresh interpreter, real stdout and stderr."""
    return subprocess.run([sys.executable, "-m", "cnclip.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


def test_version_prints_the_installed_version_on_stdout():
    done = cnclip("--version")
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"cnclip {importlib.metadata.version('cnclip')}\n"
    assert done.stderr == ""


@pytest.mark.parametrize("args", [["-h"], ["corpus", "-h"], ["corpus", "build", "-h"], ["train", "-h"],
                                  ["eval", "-h"], ["export", "-h"], ["corpus", "stats", "-h"]], ids=" ".join)
def test_short_help_works_on_every_level(args):
    done = cnclip(*args)
    assert done.returncode == 0, done.stderr
    usage = next(line for line in done.stdout.splitlines() if "Usage: " in line)
    assert f"cnclip.cli {' '.join(args[:-1])} [OPTIONS]".replace("  ", " ") in usage
    assert "No such option" not in done.stdout + done.stderr


def test_a_misspelt_option_still_fails():
    done = cnclip("--versoin")
    assert done.returncode == 2
    assert "No such option" in done.stderr
