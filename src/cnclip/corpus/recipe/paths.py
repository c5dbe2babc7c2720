"""The local files and folders a recipe names, checked when it loads.

A typo in `text.blacklist` or an evaluation set would otherwise surface only when its stage runs,
after a crawl or a download of hours; a missing eval set would even be silent decontamination
loss. Paths are relative to the working directory, as the stages read them. Globs must match
something where the stage needs at least one file; fsspec URLs are left to the source reader.
"""

from __future__ import annotations

import glob
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cnclip.corpus.recipe import Recipe


def _is_url(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def _shown(path: str) -> str:
    return repr(path[:200])


def _file_problem(key: str, path: str) -> str | None:
    local = Path(path)
    if local.is_file():
        return None
    return f"{key}: {_shown(path)} is a folder, not a file" if local.is_dir() else f"{key}: no such file {_shown(path)}"


def _source_path_problem(key: str, path: str) -> str | None:
    """A metadata/warc `path`: a file, a glob or a URL; a plain path that is no file is a typo."""
    if _is_url(path):
        return None
    local = path.removeprefix("file://")
    if glob.has_magic(local):
        return None  # ingest reports a glob that matches nothing, naming the source
    return _file_problem(key, local)


def _eval_set_problem(key: str, path: str) -> str | None:
    """An evaluation set: a folder, a tar or pHash list, or a glob of tars that matches something."""
    if _is_url(path):
        return None  # listed (and reported if empty) when its stage reads it, as a source URL is
    if glob.has_magic(path):
        return None if glob.glob(path) else f"{key}: the glob {_shown(path)} matches nothing"
    return None if Path(path).exists() else f"{key}: no such file or folder {_shown(path)}"


def _folder_problem(key: str, path: str) -> str | None:
    local = Path(path)
    if local.is_dir():
        return None
    if local.exists():
        return f"{key}: {_shown(path)} is a file, not a folder"
    return f"{key}: no such folder {_shown(path)}"


def _format_source_problems(index: int, source) -> list[str | None]:
    """The files a coco / visual_genome / cn_clip source reads, and its images folder."""
    key = f"sources[{index}]"
    if source.kind == "coco":
        problems = [_file_problem(f"{key}.annotations", source.annotations)]
    elif source.kind == "visual_genome":
        problems = [_file_problem(f"{key}.regions", source.regions)]
        if source.image_data:
            problems.append(_file_problem(f"{key}.image_data", source.image_data))
    else:
        folder = _folder_problem(f"{key}.path", source.path)
        if folder:
            return [folder]
        return [_file_problem(f"{key}.path", str(Path(source.path) / f"{source.split}_{name}"))
                for name in ("imgs.tsv", "texts.jsonl")]
    if source.stores_images:
        problems.append(_folder_problem(f"{key}.images", source.images))
    return problems


def recipe_path_problems(recipe: "Recipe") -> list[str]:
    """One `key: problem` line per missing path, in recipe order."""
    problems: list[str | None] = []
    for index, source in enumerate(recipe.sources):
        if source.kind in ("metadata", "warc"):
            problems.append(_source_path_problem(f"sources[{index}].path", source.path))
        if source.kind == "html" and source.seeds_file:
            problems.append(_file_problem(f"sources[{index}].seeds_file", source.seeds_file))
        if hasattr(source, "stores_images"):
            problems.extend(_format_source_problems(index, source))
    if recipe.text.blacklist:
        problems.append(_file_problem("text.blacklist", recipe.text.blacklist))
    for index, path in enumerate(recipe.dedup.eval_images):
        problems.append(_eval_set_problem(f"dedup.eval_images[{index}]", path))
    if recipe.embed is not None:
        model = recipe.embed.model.removeprefix("local-dir:")
        if not Path(model).exists():
            problems.append(f"embed.model: no such model file or folder {_shown(model)}")
    translate = recipe.translate
    if translate is not None and translate.model is not None and not Path(translate.model).is_dir():
        problems.append(f"translate.model: no such model folder {_shown(translate.model)}")
    return [p for p in problems if p]
