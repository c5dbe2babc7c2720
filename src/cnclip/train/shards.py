"""Which shards a run reads and how many samples they hold: shard patterns, a corpus recipe's
output or a build's manifest_dir, local or on fsspec URLs (remote.py), and the tar reader that
opens either kind.
"""

from __future__ import annotations

import glob
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Sequence

from braceexpand import braceexpand
from webdataset.tariterators import group_by_keys, tar_file_expander

from cnclip._common.errors import CnclipError
from cnclip.train import remote
from cnclip.train.config import DataSettings


class DataError(CnclipError, ValueError):
    """Shards that cannot be found or used."""




def expand_patterns(patterns: Sequence[str], origin: str = "data.train") -> list[str]:
    """Brace patterns (`shards/{00000..00099}.tar`) and globs -> a sorted list of existing files."""
    found: list[str] = []
    for pattern in patterns:
        for item in braceexpand(pattern):
            if remote.is_fsspec_url(item):
                found.extend(remote.expand(item, DataError, origin))
            elif item.startswith("pipe:") or "://" in item:
                found.append(item)  # streamed by webdataset's opener, not checked here
            elif any(ch in item for ch in "*?["):
                found.extend(sorted(glob.glob(item)))
            elif Path(item).is_file():
                found.append(item)
            else:
                raise DataError(f"{origin}: no such shard: {item}")
    shards = sorted(dict.fromkeys(found))
    if not shards:
        raise DataError(f"{origin}: the patterns match no shard: {', '.join(patterns)}")
    return shards


@dataclass
class ShardSet:
    shards: list[str]
    samples: Optional[int]  # from the corpus build (manifests or sizes.json); None if unknown
    manifest_dir: Optional[Path | str] = None  # a str when it is a URL


def _folder(location: Path | str) -> Path | str:
    """A folder as given: a URL stays a string (Path would fold its `//`)."""
    return str(location).rstrip("/") if remote.is_fsspec_url(str(location)) else Path(location)


def _in(folder: Path | str, name: str) -> str:
    return remote.join(folder, name) if isinstance(folder, str) else str(Path(folder) / name)


def _read_funnel_shards(manifest_dir: Path | str) -> str:
    """The shards folder a build's funnel.json names (a URL for a corpus published to one)."""
    funnel = _in(manifest_dir, "funnel.json")
    try:
        if isinstance(manifest_dir, str):
            text = remote.read_text(funnel, DataError, "data.manifest_dir")
        else:
            text = Path(funnel).read_text(encoding="utf-8")
        return json.loads(text)["shards_dir"]
    except DataError:
        raise
    except (OSError, ValueError, KeyError):
        raise DataError(f"data.manifest_dir: {funnel} does not name the build's shards folder "
                        "(rebuild with this cnclip, or give data.train)") from None


def resolve_train_shards(data: DataSettings) -> ShardSet:
    """The training shards and their sample count, from patterns, a corpus recipe, or a build's
    manifest_dir (its funnel.json names the shards folder)."""
    if data.corpus is not None:
        # The one place train reads corpus code: data.corpus names a corpus recipe, and only the
        # corpus's own loader knows where its build puts the shards.
        from cnclip.corpus.recipe import RecipeError, load_recipe

        try:
            recipe = load_recipe(data.corpus, check_paths=False)  # only its output folders matter here
        except RecipeError as err:
            raise DataError(f"data.corpus: {err}") from None
        shards = expand_patterns([_in(_in(_folder(recipe.output_dir), "shards"), "*.tar")], "data.corpus")
        manifest_dir = _folder(data.manifest_dir or recipe.manifest_dir)
    elif data.train is None:
        manifest_dir = _folder(data.manifest_dir)
        shards = expand_patterns([_in(_folder(_read_funnel_shards(manifest_dir)), "*.tar")], "data.manifest_dir")
    else:
        shards = expand_patterns(data.train_patterns)
        manifest_dir = _folder(data.manifest_dir) if data.manifest_dir is not None else None
    return ShardSet(shards, count_samples(shards, manifest_dir), manifest_dir)


def scan_samples(manifest_dir: Path | str):
    """A lazy frame over a build's samples/ parts, local or on a URL."""
    import polars as pl

    folder = _folder(manifest_dir)
    if isinstance(folder, str):
        parts = remote.expand(_in(_in(folder, "samples"), "*.parquet"), DataError, "data.manifest_dir")
        return remote.scan_parquet(parts, DataError) if parts else None
    parts = sorted((folder / "samples").glob("*.parquet"))
    return pl.scan_parquet(parts) if parts else None


def count_samples(shards: list[str], manifest_dir: Optional[Path | str]) -> Optional[int]:
    """Samples in `shards` per the build's samples/ manifest, else the sizes.json beside them."""
    names = {Path(s).name for s in shards}
    if manifest_dir is not None:
        import polars as pl

        try:
            samples = scan_samples(manifest_dir)
            if samples is None:
                raise DataError(f"data.manifest_dir: {manifest_dir}/samples has no manifest parts")
            counts = samples.group_by("shard").len().collect()
        except (OSError, pl.exceptions.PolarsError) as err:
            raise DataError(f"data.manifest_dir: cannot read {manifest_dir}/samples "
                            f"({str(err).splitlines()[0] if str(err) else type(err).__name__})") from None
        per_shard = {f"{s:05d}.tar": n for s, n in counts.rows()}
        return sum(per_shard.get(n, 0) for n in names)
    total = 0
    present = {_in(_shard_folder(s), Path(s).name) for s in shards}
    for folder in {_shard_folder(s) for s in shards}:
        sizes = _read_sizes(folder)
        if sizes is None:
            return None
        mine = [n for n in names if _in(folder, n) in present]
        if any(n not in sizes for n in mine):
            return None
        total += sum(sizes[n] for n in mine)
    return total


def _shard_folder(shard: str) -> Path | str:
    return remote.parent(shard) if remote.is_fsspec_url(shard) else Path(shard).parent


def _read_sizes(folder: Path | str) -> Optional[dict]:
    """The sizes.json the shard stage writes beside its tars, or None where there is none."""
    sizes_path = _in(folder, "sizes.json")
    try:
        if isinstance(folder, str):
            if not remote.is_file(sizes_path, DataError):
                return None
            return json.loads(remote.read_text(sizes_path, DataError, "data.train"))
        return json.loads(Path(sizes_path).read_text(encoding="utf-8")) if Path(sizes_path).is_file() else None
    except DataError:
        raise
    except (OSError, ValueError) as err:
        raise DataError(f"{sizes_path}: cannot read ({err})") from None


def tarfile_samples(src: Iterable[dict], handler: Callable[[Exception], bool]) -> Iterator[dict]:
    """webdataset's tarfile_samples over local paths, webdataset's own URLs and fsspec URLs.
    Members are grouped into samples one tar at a time: across tars, webdataset would merge a
    one-sample shard read twice in a row (an epoch boundary, a resampled draw) into one sample
    with duplicate members."""
    for opened in remote.open_streams(src, handler):
        yield from group_by_keys(tar_file_expander([opened], handler=handler), handler=handler)
