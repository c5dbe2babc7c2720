"""What the terminal shows: `--version`, `-h`, and the results on stdout (diagnostics on stderr)."""

import importlib.metadata
import io
import os
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


# Loaded by every interpreter of the build (PYTHONPATH): once img2dataset's downloader is imported
# (in a download lane), each part it downloads first chatters the way img2dataset does.
CHATTY_IMG2DATASET = '''
import importlib.abc, os, sys

class _Chatty(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "img2dataset.downloader":
            return None
        spec = next(s for s in (f.find_spec(name, path, target) for f in sys.meta_path if f is not self) if s)
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            call = module.Downloader.__call__

            def chatty(self, row):
                import logging
                from tqdm import tqdm
                print("Downloading starting now, check your bandwidth speed (with bwm-ng)", flush=True)
                for _ in tqdm(range(2), desc="img2dataset bar"):
                    pass
                logging.warning("img2dataset log record")
                os.write(2, b"img2dataset C-level write\\n")
                return call(self, row)

            module.Downloader.__call__ = chatty

        spec.loader.exec_module = exec_module
        return spec

sys.meta_path.insert(0, _Chatty())
'''


@pytest.mark.slow
def test_a_build_keeps_img2dataset_chatter_off_the_terminal(tmp_path):
    import json

    from conftest import free_port

    (tmp_path / "inject").mkdir()
    (tmp_path / "inject" / "sitecustomize.py").write_text(CHATTY_IMG2DATASET)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps({
        "name": "quiet", "output_dir": str(tmp_path / "out"), "manifest_dir": str(tmp_path / "manifests"),
        "sources": [{"name": "web", "kind": "sample_web", "images": 12, "seed": 5, "port": free_port()}],
        "image": {"size": 64, "min_side": 64},
        "download": {"processes": 2, "threads": 8, "timeout": 2, "retries": 0, "samples_per_part": 20,
                     "allow_networks": ["127.0.0.0/8"], "per_host_delay": 0, "per_host_concurrency": 16},
        "shard": {"samples_per_shard": 20, "processes": 1}, "text": {"processes": 1}}))
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "inject"), "CNCLIP_QUIET": ""}
    done = subprocess.run([sys.executable, "-m", "cnclip.cli", "corpus", "build", str(recipe)], capture_output=True,
                          text=True, cwd=tmp_path, timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    terminal = done.stdout + done.stderr
    assert "download: img2dataset parts" in terminal and "funnel: quiet" in terminal  # cnclip's own lines
    assert "{'" not in terminal  # stage summaries are tables, not Python dicts
    summary = terminal[terminal.index("build quiet: done in"):].splitlines()
    assert summary[1].split() == ["shards", str(tmp_path / "out" / "shards")]  # whole paths, one a line
    assert summary[2].split() == ["manifests", str(tmp_path / "manifests")]
    assert summary[3].split() == ["img2dataset's", "output", str(tmp_path / "out" / "work" / "download.log")]
    assert summary[4].split() == ["report", str(tmp_path / "manifests" / "report.html")]
    for chatter in ("bwm-ng", "img2dataset bar", "img2dataset log record", "C-level write"):
        assert chatter not in terminal, chatter
    log = (tmp_path / "out" / "work" / "download.log").read_text()
    lanes = [line for line in log.splitlines() if line.startswith("== ")]
    assert sorted(line.split(" (pid")[0].split(" ", 3)[3] for line in lanes) == ["download lane 0",
                                                                              "download lane 1"]
    parts = sum(len(json.loads(line.split("parts ", 1)[1])) for line in lanes)
    assert parts >= 2
    for chatter in ("bwm-ng", "img2dataset log record", "img2dataset C-level write"):
        assert log.count(chatter) == parts, chatter  # once per part downloaded
    assert "img2dataset bar: 100%" in log and "2/2" in log


def rendered(table) -> list[list[str]]:
    from rich.console import Console

    screen = Console(file=io.StringIO(), width=100)
    screen.print(table)
    return [line.split() for line in screen.file.getvalue().splitlines()]


def test_stage_summaries_are_small_tables():
    from cnclip.corpus.stages.dedup import DedupStage
    from cnclip.corpus.stages.download import DownloadStage

    download = rendered(DownloadStage().report({
        "by_status": {"failed_to_download": 11, "success": 256}, "retries": 0,
        "guard": {"network:blocked": 2, "ok": 265}}))
    assert download[0] == ["download:", "267", "rows", "attempted"]
    assert download[1] == ["status", "(guard:", "requests)", "count"]
    assert download[3:] == [["failed_to_download", "11"], ["success", "256"], ["guard:", "network:blocked", "2"],
                            ["guard:", "ok", "265"]]
    dedup = rendered(DedupStage().report({"dropped": {"dedup:exact_duplicate": 2, "dedup:near_duplicate": 4},
                                          "eval_images": 0}))
    assert dedup[0] == ["dedup:", "6", "rows", "dropped"]
    assert dedup[3:] == [["dedup:exact_duplicate", "2"], ["dedup:near_duplicate", "4"]]
    assert DedupStage().report({"dropped": {}, "eval_images": 0}) == "dedup: dropped nothing"
