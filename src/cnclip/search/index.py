"""A faiss inner-product index over a corpus's stored image embeddings, saved under MANIFEST_DIR/index/.

The embeddings are unit rows, so inner product is cosine. `auto` picks the kind by row count:

    rows <= FLAT_MAX_ROWS (200,000)  flat  IndexFlatIP: exact; a query scans every row (~20 ms at 200k x 512)
    more                             ivf   IVF{sqrt n},Flat, nprobe = max(8, nlist / 16): scans ~6% of the rows
    (on request)                     hnsw  HNSW32, efSearch 128: fastest queries, slowest build, ~2x memory

Files: `image-BUILD.faiss` (the index), `rows-BUILD.parquet` (row -> shard, key, uid, in index
order) and `index.json` (what it was built from: each embeddings part's name, size and mtime,
model.json's content, the kind and its parameters). index.json is written last and names its
BUILD, so a crash mid-build leaves the previous index whole; an index whose record no longer
matches the embeddings folder is stale (`stale_reason`), and search rebuilds it.

Parts are read one at a time (store.iter_parts); IVF trains on a sample drawn from each part.
"""

from __future__ import annotations

import json
import math
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import polars as pl

from cnclip._common.atomic import atomic_path, write_json_atomic
from cnclip._common.errors import CnclipError
from cnclip.embed import store

INDEX_DIR = "index"
RECORD = "index.json"
KINDS = ("auto", "flat", "ivf", "hnsw")
FLAT_MAX_ROWS = 200_000
# faiss warns below 39 training points per centroid; 64 per centroid is plenty for IVF's coarse cells.
TRAIN_PER_LIST = 64
HNSW_M, HNSW_EF_SEARCH, HNSW_EF_CONSTRUCTION = 32, 128, 80


class SearchError(CnclipError, ValueError):
    """No embeddings to index or search, an index that cannot be read, a bad query."""


@dataclass
class LoadedIndex:
    index: object  # a faiss index, search parameters set
    rows: pl.DataFrame  # shard, key, uid in index order
    record: dict


def embeddings_dir(manifest_dir: Path) -> Path:
    return Path(manifest_dir) / "embeddings"


def index_dir(manifest_dir: Path) -> Path:
    return Path(manifest_dir) / INDEX_DIR


def source_record(manifest_dir: Path) -> dict:
    """What an index is built from: each embeddings part (name, size, mtime) and model.json.
    Size and mtime, not a hash: checking must cost nothing per query on a corpus of GBs."""
    folder = embeddings_dir(manifest_dir)
    if not folder.is_dir():
        raise SearchError(f"{folder}: missing (the corpus was built without an embed section)")
    parts = store.parts(folder)
    return {"parts": [{"name": p.name, "size": p.stat().st_size, "mtime_ns": p.stat().st_mtime_ns} for p in parts],
            "model": store.read_model_record(folder)}


def choose_kind(kind: str, rows: int) -> str:
    if kind not in KINDS:
        raise SearchError(f"--kind {kind}: not one of {', '.join(KINDS)}")
    if kind == "auto":
        return "flat" if rows <= FLAT_MAX_ROWS else "ivf"
    return kind


def _ivf_lists(rows: int) -> int:
    """sqrt(n) lists, fewer when the rows cannot train them: k-means training grows with the
    square of the lists, and at 1M rows sqrt(n) trains in about a minute on one core."""
    return max(1, min(int(math.sqrt(rows)), rows // TRAIN_PER_LIST))


def _part_rows(folder: Path) -> list[int]:
    import pyarrow.parquet as pq

    return [pq.ParquetFile(p).metadata.num_rows for p in store.parts(folder)]


def _training_sample(folder: Path, counts: list[int], wanted: int, seed: int = 0) -> np.ndarray:
    """About `wanted` rows drawn evenly from every part, reading one part at a time."""
    total = sum(counts)
    rng = np.random.default_rng(seed)
    picked = []
    for frame, count in zip(store.iter_parts(folder, ["image_embedding"]), counts, strict=True):
        take = min(count, math.ceil(wanted * count / total))
        chosen = np.sort(rng.choice(count, size=take, replace=False))
        picked.append(store.matrix(frame[chosen], "image_embedding"))
    return np.ascontiguousarray(np.concatenate(picked))


def _empty_index(kind: str, width: int, rows: int, folder: Path, counts: list[int]):
    """A faiss index of `kind`, trained where the kind needs it; (index, its parameters)."""
    import faiss

    if kind == "flat":
        return faiss.IndexFlatIP(width), {}
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(width, HNSW_M, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        return index, {"M": HNSW_M, "efConstruction": HNSW_EF_CONSTRUCTION, "efSearch": HNSW_EF_SEARCH}
    nlist = _ivf_lists(rows)
    index = faiss.index_factory(width, f"IVF{nlist},Flat", faiss.METRIC_INNER_PRODUCT)
    sample = _training_sample(folder, counts, nlist * TRAIN_PER_LIST)
    faiss.normalize_L2(sample)
    index.train(sample)
    return index, {"nlist": nlist, "nprobe": min(nlist, max(8, nlist // 16))}


def _set_search_params(index, record: dict) -> None:
    params = record.get("params", {})
    if record["kind"] == "ivf":
        index.nprobe = params["nprobe"]
    elif record["kind"] == "hnsw":
        index.hnsw.efSearch = params["efSearch"]


def build_index(manifest_dir: Path, kind: str = "auto") -> dict:
    """Build the index of `manifest_dir`'s image embeddings; returns its record (index.json)."""
    import faiss

    manifest_dir = Path(manifest_dir)
    source = source_record(manifest_dir)
    folder = embeddings_dir(manifest_dir)
    counts = _part_rows(folder)
    rows = sum(counts)
    if rows == 0:
        raise SearchError(f"{folder}: the embedding parts hold no rows")
    requested, kind = kind, choose_kind(kind, rows)
    width = int(source["model"]["width"])
    index, params = _empty_index(kind, width, rows, folder, counts)
    mapping = []
    columns = ["key", "uid", "image_embedding"]
    for path, frame in zip(store.parts(folder), store.iter_parts(folder, columns), strict=True):
        vectors = store.matrix(frame, "image_embedding")
        if vectors.shape[1] != width:
            raise SearchError(f"{path}: embeddings {vectors.shape[1]} wide, model.json says {width}")
        vectors = np.ascontiguousarray(vectors)
        faiss.normalize_L2(vectors)  # float16 storage leaves norms ~1e-4 off 1: scores stay true cosines
        index.add(vectors)
        mapping.append(frame.select(pl.lit(_shard_of(path), pl.Int64).alias("shard"), "key", "uid"))
    out = index_dir(manifest_dir)
    out.mkdir(parents=True, exist_ok=True)
    build = uuid.uuid4().hex[:12]
    record = {**source, "requested": requested, "kind": kind, "params": params, "rows": rows, "width": width,
              "build": build, "index_file": f"image-{build}.faiss", "rows_file": f"rows-{build}.parquet"}
    with atomic_path(out / record["index_file"]) as tmp:
        faiss.write_index(index, str(tmp))
    with atomic_path(out / record["rows_file"]) as tmp:
        pl.concat(mapping).write_parquet(tmp)
    write_json_atomic(out / RECORD, record)
    _remove_other_builds(out, record)
    return record


def _shard_of(part: Path) -> int:
    """Published embedding parts are named like the samples/ parts: 00003.parquet is shard 3."""
    try:
        return int(part.stem)
    except ValueError:
        raise SearchError(f"{part}: not a shard's embeddings part (expected NNNNN.parquet)") from None


def _remove_other_builds(out: Path, record: dict) -> None:
    """Earlier builds' files (only the index's own naming pattern: nothing else in the folder)."""
    keep = {record["index_file"], record["rows_file"]}
    for old in [*out.glob("image-*.faiss"), *out.glob("rows-*.parquet")]:
        if old.name not in keep:
            old.unlink(missing_ok=True)


def read_record(manifest_dir: Path) -> Optional[dict]:
    path = index_dir(manifest_dir) / RECORD
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        return None  # a damaged record is a missing index: it is rebuilt


def stale_reason(manifest_dir: Path, record: Optional[dict]) -> Optional[str]:
    """Why the index under `manifest_dir` does not match its embeddings (None: it does)."""
    if record is None:
        return "no index yet"
    source = source_record(manifest_dir)
    if record.get("model") != source["model"]:
        return "embeddings/model.json changed since the index was built"
    if record.get("parts") != source["parts"]:
        return "the embedding parts changed since the index was built"
    out = index_dir(manifest_dir)
    if not all((out / record.get(f, "-")).is_file() for f in ("index_file", "rows_file")):
        return "index files missing"
    return None


def load_index(manifest_dir: Path) -> LoadedIndex:
    """The saved index, with its row mapping and search parameters (no staleness check)."""
    import faiss

    out = index_dir(manifest_dir)
    record = read_record(manifest_dir)
    if record is None:
        raise SearchError(f"{out / RECORD}: missing (run cnclip corpus index {manifest_dir})")
    try:
        index = faiss.read_index(str(out / record["index_file"]))
    except RuntimeError:
        raise SearchError(f"{out / record['index_file']}: not a readable faiss index") from None
    _set_search_params(index, record)
    return LoadedIndex(index, pl.read_parquet(out / record["rows_file"]), record)


def ensure_index(manifest_dir: Path, notify=None) -> LoadedIndex:
    """The index of `manifest_dir`, (re)built first when missing or stale (`notify` hears why),
    of the kind asked for when it was last built (auto the first time)."""
    record = read_record(manifest_dir)
    reason = stale_reason(manifest_dir, record)
    if reason is not None:
        if notify is not None:
            notify(f"building the search index of {manifest_dir} ({reason})")
        build_index(manifest_dir, (record or {}).get("requested", "auto"))
    return load_index(manifest_dir)
