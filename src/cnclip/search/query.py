"""Text -> image and image -> image search over a built corpus.

    from cnclip.search import search
    hits = search("manifests/demo", text="红色的圆形", top=10)   # [{"rank", "score", "key", "caption", "url", ...}]

The model is the one that embedded the corpus (embeddings/model.json) unless another is given;
its text side normalizes a query as the corpus normalized its captions (train/tokenizer.py), so
`２０２３年ＮＢＡ總決賽` finds what `2023年NBA总决赛` finds. The index is built on first use.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np
import polars as pl

from cnclip.embed import store
from cnclip.search.index import LoadedIndex, SearchError, embeddings_dir, ensure_index

HIT_COLUMNS = ("rank", "score", "key", "caption", "url", "shard", "uid")


def model_path(manifest_dir: Path, model: Optional[Union[str, Path]] = None) -> Path:
    """`model` when given, else the model embeddings/model.json names (a path, possibly written
    as `kind:path` the way an Encoder names what it loaded)."""
    if model is not None:
        path = Path(model)
        if not path.exists():
            raise SearchError(f"{path}: no such model file or folder (--model)")
        return path
    folder = embeddings_dir(manifest_dir)
    record_path = folder / store.MODEL_RECORD
    if not folder.is_dir():
        raise SearchError(f"{folder}: missing (the corpus was built without an embed section)")
    named = str(store.read_model_record(folder).get("model", ""))
    for candidate in (named, named.split(":", 1)[-1]):
        if candidate and Path(candidate).exists():
            return Path(candidate)
    raise SearchError(f"{record_path}: its model {named or '(none)'} is not on this machine (give --model PATH)")


def read_image(path: Union[str, Path]):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.load()
            return image.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError) as err:
        reason = "not an image" if isinstance(err, UnidentifiedImageError) else (
            getattr(err, "strerror", None) or str(err).splitlines()[0])
        raise SearchError(f"{path}: cannot read the image ({reason})") from None


@dataclass
class Searcher:
    """A corpus's index, its samples' captions and URLs, and the model, loaded once for many queries."""

    manifest_dir: Path
    index: LoadedIndex
    samples: pl.DataFrame  # uid, caption, url
    encoder: object

    @classmethod
    def open(cls, manifest_dir: Union[str, Path], model: Optional[Union[str, Path]] = None,
             device: Optional[str] = None, notify: Optional[Callable[[str], None]] = None) -> "Searcher":
        from cnclip.embed.encoder import load_encoder

        manifest_dir = Path(manifest_dir)
        path = model_path(manifest_dir, model)  # before the index: a missing model is said before any build
        loaded = ensure_index(manifest_dir, notify)
        encoder = load_encoder(path, device)
        if encoder.dim != loaded.record["width"]:
            raise SearchError(f"{path}: embeds {encoder.dim} wide, the corpus's embeddings are "
                              f"{loaded.record['width']} wide (another model embedded it)")
        return cls(manifest_dir, loaded, _samples(manifest_dir), encoder)

    def query_vector(self, text: Optional[str] = None, image: Optional[Union[str, Path, object]] = None) -> np.ndarray:
        if (text is None) == (image is None):
            raise SearchError("give a text query or --image PATH (one of them)")
        if text is not None:
            if not text.strip():
                raise SearchError("the text query is empty")
            return self.encoder.encode_texts([text])
        picture = read_image(image) if isinstance(image, (str, Path)) else image
        return self.encoder.encode_images([picture])

    def search(self, text: Optional[str] = None, image=None, top: int = 10) -> list[dict]:
        """The `top` nearest samples, best first: rank, score (cosine), key, caption, url, shard, uid."""
        if top < 1:
            raise SearchError(f"--top {top}: must be at least 1")
        vector = np.ascontiguousarray(self.query_vector(text, image), dtype=np.float32)
        scores, rows = self.index.index.search(vector, min(top, self.index.index.ntotal))
        found = rows[0] >= 0  # an approximate index may find fewer than asked
        hits = self.index.rows[rows[0][found].tolist()].with_columns(
            pl.Series("score", scores[0][found], pl.Float32), pl.int_range(1, found.sum() + 1).alias("rank"))
        hits = hits.join(self.samples, on="uid", how="left").sort("rank")
        return hits.select(HIT_COLUMNS).to_dicts()


def _samples(manifest_dir: Path) -> pl.DataFrame:
    parts = sorted((manifest_dir / "samples").glob("*.parquet"))
    if not parts:
        raise SearchError(f"{manifest_dir / 'samples'}: no manifest parts (not a finished build)")
    return pl.concat([pl.read_parquet(p, columns=["uid", "caption", "url"]) for p in parts])


def search(manifest_dir: Union[str, Path], text: Optional[str] = None, image=None, top: int = 10,
           model: Optional[Union[str, Path]] = None, device: Optional[str] = None) -> list[dict]:
    """One query (a text, or an image path / PIL image) against `manifest_dir`; rows best first."""
    return Searcher.open(manifest_dir, model, device).search(text=text, image=image, top=top)
