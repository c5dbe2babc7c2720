"""Recipe sections of the embedding steps: `embed` (the model and how it runs), `filter.clip_score`
and `dedup.semantic` (SemDeDup), which read the embeddings the embed stage writes."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, model_validator

from cnclip._common.strict import StrictModel


class EmbedSettings(StrictModel):
    """Image and text embeddings of every sample dedup kept, with a local Chinese CLIP model."""

    model: str = Field(description="a cnclip checkpoint .pt, an open_clip local-dir: folder or a Chinese-CLIP "
                                   "checkpoint")
    architecture: Optional[str] = Field(
        default=None, description="a Chinese-CLIP checkpoint's zoo name or open_clip config file (default: told "
                                  "from its shapes)")
    batch_size: int = Field(default=64, ge=1, le=65_536)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # One model in memory per worker: more than one process on one GPU only splits it.
    processes: Optional[int] = Field(default=None, ge=1, le=1024,
                                     description="worker processes for this stage (default: 1)")


class ClipScoreFilter(StrictModel):
    """Keep pairs whose image-text cosine is at least `min_score`, or the top `keep_fraction`."""

    min_score: Optional[float] = Field(default=None, ge=-1.0, le=1.0)
    keep_fraction: Optional[float] = Field(default=None, gt=0.0, le=1.0)

    @model_validator(mode="after")
    def _exactly_one(self) -> "ClipScoreFilter":
        if (self.min_score is None) == (self.keep_fraction is None):
            raise ValueError("give exactly one of min_score and keep_fraction")
        return self


class FilterSettings(StrictModel):
    """Filters over the samples' embeddings (the text filters are under `text:`)."""

    clip_score: Optional[ClipScoreFilter] = None


class SemanticDedup(StrictModel):
    """SemDeDup: k-means over the image embeddings, pairs within a cluster above max_similarity."""

    clusters: int = Field(default=100, ge=1, le=1_000_000)
    max_similarity: float = Field(default=0.95, gt=0.0, le=1.0)
    seed: int = 0
    # faiss itself trains on at most 256 rows a centroid (it samples down and warns beyond), so
    # more rows than that only cost the driver memory; the sample is what the driver holds.
    sample: Optional[int] = Field(default=None, ge=1, le=100_000_000,
                                  description="rows k-means trains on, drawn by uid (default: clusters x 256)")

    @property
    def sample_rows(self) -> int:
        """The k-means sample's size: `sample`, or 256 rows a centroid."""
        return self.sample if self.sample is not None else self.clusters * 256
