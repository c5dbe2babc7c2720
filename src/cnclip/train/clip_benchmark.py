"""clip_benchmark's WebDataset layout, read directly, so a set built for clip_benchmark (or by
cnclip's eval-set writer) is evaluated as it lies, without spelling out its shards:

    DIR/dataset_type.txt                       "retrieval"; absent or anything else: classification
    DIR/classnames.txt                         classification: one name per line ({key}.cls indexes them)
    DIR/zeroshot_classification_templates.txt  optional prompts, one per line, `{c}` or `{}` for the name
    DIR/{split}/nshards.txt                    n, the number of shards
    DIR/{split}/0.tar ... {n-1}.tar

This is what clip_benchmark's `build_wds_dataset(split=..., data_dir=DIR)` reads. Whatever the user
names explicitly (kind, classnames, templates) wins over the folder's files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from cnclip.train.config import ConfigError, EvalSet, TrainConfig
from cnclip.train.shards import DataError

TYPE_FILE = "dataset_type.txt"
CLASSNAMES_FILE = "classnames.txt"
TEMPLATES_FILE = "zeroshot_classification_templates.txt"
NSHARDS_FILE = "nshards.txt"


def read_text(path: Path) -> str:
    """A set's small text file (a DataError naming it when it cannot be read)."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: cannot read ({getattr(err, 'strerror', None) or err})") from None


def _read(path: Path, origin: str) -> str:
    try:
        return read_text(path)
    except DataError as err:
        raise DataError(f"{origin}: {err}") from None


def read_class_names(path: Path) -> list[str]:
    """A class-name file: line i (from 0) names class i, the `{key}.cls` label i, as in clip_benchmark.

    A blank line before the last name is a class without a name: dropping it would shift every
    label after it onto the wrong name, keeping it would score a class no prompt describes, so it
    is an error naming the line. Blank lines after the last name are only the file's end."""
    names = [line.strip() for line in read_text(path).splitlines()]
    while names and not names[-1]:
        names.pop()
    if not names:
        raise DataError(f"{path}: no class names (one per line, line n for {{key}}.cls label n-1)")
    blank = next((number for number, name in enumerate(names, 1) if not name), None)
    if blank is not None:
        raise DataError(f"{path}: line {blank} is blank (one class name per line, line n for {{key}}.cls "
                        "label n-1; blank lines only at the end)")
    return names


def _splits(folder: Path) -> list[str]:
    """The split subfolders that do hold an nshards.txt (named in the error for a wrong --split)."""
    return sorted(p.name for p in folder.iterdir() if (p / NSHARDS_FILE).is_file())


def benchmark_shards(folder: Path, split: str, origin: str) -> list[str]:
    """DIR/{split}/0.tar ... {n-1}.tar, n from nshards.txt (mandatory, as for clip_benchmark)."""
    nshards = folder / split / NSHARDS_FILE
    if not nshards.is_file():
        found = _splits(folder)
        if found:
            hint = f"its splits: {', '.join(found)}"
        elif any(folder.glob("*.tar")):
            hint = f"for the tars in it give '{folder / '*.tar'}'"
        else:
            hint = "give shard patterns, or a folder in that layout"
        raise DataError(f"{origin}: {folder} is no clip_benchmark WebDataset folder for split {split!r} "
                        f"(no {split}/{NSHARDS_FILE}; {hint})")
    text = _read(nshards, origin).strip()
    if not text.isdigit() or int(text) < 1:
        raise DataError(f"{origin}: {nshards}: expected the number of shards (a positive integer), got {text[:40]!r}")
    count = int(text)
    last = folder / split / f"{count - 1}.tar"
    if not last.is_file():  # checked first: a wrong count is not a list of millions of names
        raise DataError(f"{origin}: {nshards} says {count} shards, but there is no {last}")
    return [str(folder / split / f"{i}.tar") for i in range(count)]


def folder_kind(folder: Path, origin: str) -> str:
    """retrieval when dataset_type.txt says so; classification (our `zeroshot`) otherwise, as in
    clip_benchmark, which treats a missing file as classification."""
    path = folder / TYPE_FILE
    if not path.is_file():
        return "zeroshot"
    return "retrieval" if _read(path, origin).strip().lower() == "retrieval" else "zeroshot"


def resolve_eval_set(eval_set: EvalSet, origin: Optional[str] = None) -> EvalSet:
    """The set with everything evaluation needs spelled out: its kind, its shard files (a
    clip_benchmark folder expanded) and, for zero-shot, its class-name and template files.
    Resolving a resolved set changes nothing."""
    origin = origin or f"eval.sets[{eval_set.name}]"
    folder = eval_set.benchmark_dir
    if folder is None:
        return eval_set.model_copy(update={"kind": eval_set.kind or "retrieval"})
    shards = benchmark_shards(folder, eval_set.split, origin)
    kind = eval_set.kind or ("zeroshot" if eval_set.classnames is not None else folder_kind(folder, origin))
    update: dict = {"kind": kind, "data": shards}
    if kind == "zeroshot":
        classnames = eval_set.classnames
        if classnames is None:
            classnames = folder / CLASSNAMES_FILE
            if not classnames.is_file():
                raise DataError(f"{origin}: {folder} is a classification set without {CLASSNAMES_FILE} "
                                "(one class name per line; or name a file with classnames / --classnames)")
        templates = eval_set.templates
        if templates is None and (folder / TEMPLATES_FILE).is_file():
            templates = folder / TEMPLATES_FILE
        update.update(classnames=classnames, templates=templates)
    return eval_set.model_copy(update=update)


def _class_names(eval_set: EvalSet) -> list[str]:
    try:
        return read_class_names(eval_set.classnames)
    except DataError as err:
        raise DataError(f"eval.sets[{eval_set.name}]: {err}") from None


def resolve_eval_sets(cfg: TrainConfig) -> list[EvalSet]:
    """A training config's eval sets, read once before training (a folder's kind, shards and class
    names, each class-name file itself), so a wrong folder or a blank class name fails at the start
    rather than at the first evaluation hours later."""
    sets = [resolve_eval_set(s) for s in cfg.eval.sets]
    for eval_set in sets:
        if eval_set.kind == "zeroshot":
            _class_names(eval_set)
    if cfg.stage1.patience is not None and not any(s.kind == "retrieval" for s in sets):
        raise ConfigError("stage1.patience needs a retrieval set in eval.sets (the folders given hold "
                          "classification sets)")
    return sets
