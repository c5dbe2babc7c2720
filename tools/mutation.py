"""`make mutation`: mutmut over the areas in tools/mutation_areas.toml, one area at a time.

Why a driver around mutmut: mutmut 3 copies the source tree into `mutants/` and imports it from
there, but the package lives in `src/cnclip/` (an editable install), so a copy of the repository
layout would leave `src/` in every import path and the tests would import the editable install's
original files instead of the mutants. The driver lays each area out as the installed package
(`cnclip/...`, copied from `src/cnclip/`) in `build/mutation/<area>/`, writes a mutmut config
naming that area's files and fast tests, runs mutmut there, and prints the kill rate and every
survivor's diff. Nothing in the working tree is touched.

    python tools/mutation.py                    # every area
    python tools/mutation.py text dedup         # some areas
    python tools/mutation.py --sample 40 state  # a deterministic sample of 40 mutants per area
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path, PurePosixPath

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser from PyPI (the mutation extra)
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
AREAS = REPO / "tools" / "mutation_areas.toml"
STAGE = REPO / "build" / "mutation"
# the folder setuptools finds the package in (pyproject's packages.find); below it, repository
# paths are the installed layout
SOURCE_ROOT = "src"
PACKAGE = "cnclip"
# what tests read from the repository besides the package and tests/
ALSO_COPY = ["recipes", "manifests/README.md", "README.md"]
# mutmut's statuses that count as caught; "suspicious" (an unknown exit code), "no tests" and
# "not checked" count as survivors
KILLED = {"killed", "timeout", "segfault", "caught by type check"}


def installed_path(repo_path: str) -> str:
    """src/cnclip/corpus/stages/text.py -> cnclip/corpus/stages/text.py: where the file lives in
    the import layout (what mutmut's only_mutate names)."""
    path = PurePosixPath(repo_path)
    if path.parts[:2] != (SOURCE_ROOT, PACKAGE):
        raise SystemExit(f"{AREAS.name}: {repo_path} is not a file of the package ({SOURCE_ROOT}/{PACKAGE}/...)")
    return str(path.relative_to(SOURCE_ROOT))


def missing_files(areas: dict) -> list[str]:
    """Area files or tests that are not in the repository: after a move, an area would otherwise
    mutate nothing (or run no tests) and report 100%."""
    return [f"{area}: {path}" for area, spec in areas.items() for path in [*spec["files"], *spec["tests"]]
            if not (REPO / path).is_file()]


def lay_out(area: str, spec: dict) -> Path:
    """A fresh copy of the package in its installed layout, the tests, and a mutmut config."""
    root = STAGE / area
    shutil.rmtree(root, ignore_errors=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(REPO / SOURCE_ROOT / PACKAGE, root / PACKAGE, ignore=ignore)
    shutil.copytree(REPO / "tests", root / "tests", ignore=ignore)
    for path in ALSO_COPY:
        source, target = REPO / path, root / path
        target.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if source.is_dir() else shutil.copy2)(source, target)
    mutmut = {
        "source_paths": [PACKAGE],
        "only_mutate": [installed_path(p) for p in spec["files"]],
        "also_copy": sorted({p.split("/")[0] for p in ALSO_COPY}),
        "pytest_add_cli_args": ["-p", "no:cacheprovider", "-m", "not slow", "-q"],
        "pytest_add_cli_args_test_selection": list(spec["tests"]),
        "use_git_change_detection": False,
        # polars' thread pool does not survive a fork: workers forked from the process that ran
        # the stats pass hang (every mutant a timeout). A fork server that only collected the
        # tests has not started the pool yet.
        "process_isolation": "forkserver",
    }
    config = (REPO / "pyproject.toml").read_text(encoding="utf-8") + "\n[tool.mutmut]\n" + "".join(
        f"{key} = {json.dumps(value)}\n" for key, value in mutmut.items()
    )
    (root / "pyproject.toml").write_text(config, encoding="utf-8")
    # Made now, not by mutmut: a PYTHONPATH entry missing when Python starts is cached as
    # "nothing here", and the tests would import the editable install's original files.
    (root / "mutants").mkdir()
    return root


def mutmut(root: Path, *args: str, log: Path | None = None) -> subprocess.CompletedProcess:
    """mutmut under nice; `log` gets its output as it runs (a run takes minutes), else captured."""
    env = {**os.environ, "PYTHONPATH": str(root / "mutants"), "OMP_NUM_THREADS": "1",
           "NO_ALBUMENTATIONS_UPDATE": "1", "CNCLIP_QUIET": "1"}
    command = ["nice", "-n", "10", str(Path(sys.executable).with_name("mutmut")), *args]
    if log is None:
        return subprocess.run(command, cwd=root, env=env, text=True, capture_output=True)
    with log.open("a", encoding="utf-8") as stream:
        return subprocess.run(command, cwd=root, env=env, text=True, stdout=stream, stderr=subprocess.STDOUT)


def results(root: Path) -> dict[str, str]:
    out = mutmut(root, "results", "--all", "true").stdout
    return dict(re.findall(r"^\s+(\S+): (.+)$", out, flags=re.M))


def in_area(name: str, spec: dict) -> bool:
    globs = spec.get("functions")
    return not globs or any(fnmatch.fnmatch(name, g) for g in globs)


def sample(names: list[str], count: int) -> list[str]:
    """The same `count` mutants on every run: ordered by a hash of their name."""
    return sorted(names, key=lambda n: hashlib.sha256(n.encode()).hexdigest())[:count]


def run_area(area: str, spec: dict, children: int, count: int | None, rerun: bool = True) -> dict:
    """Run one area from a fresh layout (no results cached from older sources or tests); with
    rerun=False, only report on the mutants checked by the area's last run."""
    if not rerun:
        root = STAGE / area
        statuses = {n: s for n, s in results(root).items() if in_area(n, spec) and s != "not checked"}
        return summarize(root, area, spec, statuses)
    root = lay_out(area, spec)
    log = STAGE / f"{area}.log"
    log.unlink(missing_ok=True)
    targets = list(spec.get("functions", []))
    if count is not None:
        # a first run with a pattern that matches no mutant generates them all and runs nothing
        mutmut(root, "run", "--max-children", str(children), "cnclip.none.x_none__mutmut_*", log=log)
        targets = sample([n for n in results(root) if in_area(n, spec)], count)
    print(f"== {area}: mutmut running, progress in {log}", flush=True)
    if mutmut(root, "run", "--max-children", str(children), *targets, log=log).returncode != 0:
        raise SystemExit(f"mutmut failed in area {area}: see {log} (its tree is in {root})")
    statuses = {n: s for n, s in results(root).items() if in_area(n, spec) and (not count or n in targets)}
    return summarize(root, area, spec, statuses)


def summarize(root: Path, area: str, spec: dict, statuses: dict[str, str]) -> dict:
    equivalent = spec.get("equivalent", {})
    survivors = sorted(n for n, s in statuses.items() if s not in KILLED)
    killed = len(statuses) - len(survivors)
    unexplained = [n for n in survivors if n not in equivalent]
    return {"area": area, "mutants": len(statuses), "killed": killed, "survivors": survivors,
            "unexplained": unexplained, "statuses": statuses,
            "diffs": {n: mutmut(root, "show", n).stdout for n in survivors}, "equivalent": equivalent}


def report(result: dict) -> str:
    total, killed = result["mutants"], result["killed"]
    rate = killed / total if total else 1.0
    explained = len(result["survivors"]) - len(result["unexplained"])
    lines = [f"== {result['area']}: {killed}/{total} killed ({rate:.1%}); "
             f"{explained} survivors listed as equivalent, {len(result['unexplained'])} not"]
    for name in result["survivors"]:
        why = result["equivalent"].get(name, "NOT LISTED AS EQUIVALENT")
        lines.append(f"-- {name} [{result['statuses'][name]}]: {why}")
        lines.append(result["diffs"][name].rstrip())
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    areas = tomllib.loads(AREAS.read_text(encoding="utf-8"))["areas"]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("areas", nargs="*", help=f"areas to run (default: all of {', '.join(areas)})")
    parser.add_argument("--max-children", type=int, default=2, help="parallel mutants (default 2)")
    parser.add_argument("--sample", type=int, help="run a deterministic sample of N mutants per area")
    parser.add_argument("--min-rate", type=float, default=0.9, help="fail below this kill rate")
    parser.add_argument("--report", action="store_true",
                        help="no run: report the last run's results against the current equivalent lists")
    args = parser.parse_args(argv)
    unknown = [a for a in args.areas if a not in areas]
    if unknown:
        parser.error(f"unknown area {', '.join(unknown)}; {AREAS.name} has {', '.join(areas)}")
    missing = missing_files(areas)
    if missing:
        parser.error(f"{AREAS.name} names files that do not exist: {'; '.join(missing)}")
    failed = []
    for area in args.areas or list(areas):
        result = run_area(area, areas[area], args.max_children, args.sample, rerun=not args.report)
        text = report(result)
        print(text, flush=True)
        (STAGE / f"{area}.txt").write_text(text + "\n", encoding="utf-8")
        if result["mutants"] and result["killed"] / result["mutants"] < args.min_rate:
            failed.append(area)
    if failed:
        print(f"kill rate under {args.min_rate:.0%} in: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
