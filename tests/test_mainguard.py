"""Worker processes from a script's unguarded top level: refused at once, in the parent, in one line.

Each script appends a line to a marker file from its top level, outside any guard, so the marker
counts how many processes ran the script: a spawned worker re-runs it.
"""

import ast
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from cnclip._common.mainguard import guarded_ranges
from test_train_support import write_config

REPO = Path(__file__).resolve().parents[1]
HEADER = """\
import math, sys
with open(sys.argv[1], "a") as marker:
    marker.write("ran\\n")
from cnclip.corpus.runtime.engine import LocalEngine


def main():
    print(LocalEngine(2).map_parts(math.sqrt, [1.0, 4.0, 9.0], "roots"))

"""


def run_script(tmp_path: Path, body: str, name: str = "script.py") -> tuple[subprocess.CompletedProcess, int]:
    script = tmp_path / name
    script.write_text(body, encoding="utf-8")
    marker = tmp_path / f"{name}.runs"
    env = {**os.environ, "CNCLIP_QUIET": "1", "NO_ALBUMENTATIONS_UPDATE": "1"}
    result = subprocess.run([sys.executable, str(script), str(marker)], capture_output=True, text=True,
                            cwd=tmp_path, env=env, timeout=120)
    runs = len(marker.read_text().splitlines()) if marker.exists() else 0
    return result, runs


def test_a_guarded_script_runs_its_workers(tmp_path):
    result, runs = run_script(tmp_path, HEADER + 'if __name__ == "__main__":\n    main()\n')
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[1.0, 2.0, 3.0]"
    assert runs == 3  # the script, then each of the 2 spawned workers importing it (guarded: no rerun of main)


@pytest.mark.parametrize("call", ["main()\n",
                                  'if __name__ != "__main__":\n    pass\nmain()\n',
                                  "try:\n    main()\nfinally:\n    pass\n"])
def test_an_unguarded_script_fails_at_once_in_one_line(tmp_path, call):
    result, runs = run_script(tmp_path, HEADER + call)
    assert result.returncode == 1
    assert runs == 1  # no worker was started, so nothing ran the script again
    line = max(i for i, text in enumerate((HEADER + call).splitlines(), 1) if text.strip() == "main()")
    assert result.stderr == (f"error: {tmp_path / 'script.py'}:{line}: roots starts worker processes, which re-run "
                             "this script; put the call under `if __name__ == \"__main__\":` (see the README's "
                             "Python API)\n")  # one line, no traceback, nothing from a worker


def test_an_unguarded_build_is_refused_before_any_work(tmp_path):
    """The README's corpus snippet pasted without the guard: no folder written, no sample web started."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: r\noutput_dir: {tmp_path}/o\nmanifest_dir: {tmp_path}/m\n"
                      "sources:\n  - {name: web, kind: sample_web, images: 20}\n", encoding="utf-8")
    body = textwrap.dedent(f"""\
        import sys
        with open(sys.argv[1], "a") as marker:
            marker.write("ran\\n")
        from cnclip.corpus import load_recipe, build
        build(load_recipe({str(recipe)!r}))
        """)
    result, runs = run_script(tmp_path, body)
    assert result.returncode == 1 and runs == 1
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ") and result.stderr.endswith(
        ":5: cnclip.corpus.build starts worker processes, which re-run this script; put the call under "
        "`if __name__ == \"__main__\":` (see the README's Python API)\n")
    assert not (tmp_path / "o").exists() and not (tmp_path / "m").exists()


def test_guarded_ranges_reads_the_guard_forms(tmp_path):
    script = tmp_path / "s.py"
    script.write_text("x = 1\nif '__main__' == __name__:\n    a()\n    b()\nif __name__ != '__main__':\n    c()\n"
                      "else:\n    d()\nif __name__ == '__main__' and x:\n    e()\n", encoding="utf-8")
    assert guarded_ranges(str(script)) == ((3, 4), (8, 8))  # `and x` is not a guard this check can trust
    (tmp_path / "bad.py").write_text("def (:\n", encoding="utf-8")
    assert guarded_ranges(str(tmp_path / "bad.py")) is None  # unreadable: not judged, not refused


def readme_python_blocks() -> list[str]:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_readme_snippets_are_in_main_guard_form():
    """Pasted into a script file they run: only imports outside `if __name__ == "__main__":`."""
    blocks = readme_python_blocks()
    assert len(blocks) >= 2
    for block in blocks:
        tree = ast.parse(block)
        loose = [node for node in tree.body if not isinstance(node, (ast.Import, ast.ImportFrom, ast.FunctionDef))
                 and not (isinstance(node, ast.If) and ast.unparse(node.test) == "__name__ == '__main__'")]
        assert not loose, f"outside the guard: {ast.unparse(loose[0])}"


def test_an_unguarded_training_script_with_spawned_dataloader_workers_is_refused(tmp_path):
    """Where DataLoader workers are spawned (macOS's and Windows' default), the training API refuses
    before reading a shard or writing the run folder."""
    config = write_config(tmp_path, str(tmp_path / "none-yet.tar"), data={"train": "x.tar", "workers": 2})
    body = textwrap.dedent(f"""\
        import multiprocessing, sys
        with open(sys.argv[1], "a") as marker:
            marker.write("ran\\n")
        multiprocessing.set_start_method("spawn")
        from cnclip.train import load_config, train
        train(load_config({config!r}))
        """)
    result, runs = run_script(tmp_path, body)
    assert result.returncode == 1 and runs == 1, result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ") and result.stderr.endswith(
        ":6: cnclip.train.train with data.workers starts worker processes, which re-run this script; put the "
        "call under `if __name__ == \"__main__\":` (see the README's Python API)\n")
    assert not (tmp_path / "run").exists()


def test_the_error_is_catchable_and_names_the_call_site(tmp_path):
    """Code that wants to handle it can: it is a CnclipError (and an Exception), raised in the parent."""
    body = HEADER + textwrap.dedent("""\
        from cnclip._common.errors import CnclipError
        try:
            main()
        except CnclipError as err:
            print("caught:", err)
        """)
    result, runs = run_script(tmp_path, body)
    assert result.returncode == 0 and runs == 1 and result.stderr == ""
    line = max(i for i, text in enumerate(body.splitlines(), 1) if text.strip() == "main()")
    assert result.stdout.startswith(f"caught: {tmp_path / 'script.py'}:{line}: roots starts worker processes")
