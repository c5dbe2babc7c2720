"""Recipe schema for the published caption datasets: COCO captions, Visual Genome region
descriptions, and Chinese-CLIP's own TSV + JSONL layout (MUGE, Flickr30K-CN and COCO-CN are
distributed in it).

Their images are local files, base64 in a TSV, or URLs named in the JSON. Local and base64
images are written once under the build's work/sources/<name>/ and read from there by the
download stage (as file:// URLs the build allows in its own folder), so every row goes through
the same download, hash and dedup as a web image.
"""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, field_validator, model_validator

from cnclip._common.strict import StrictModel
from cnclip.corpus.recipe.crawl import SourceName

# `images: url`: the image URLs the JSON names are downloaded instead of local files.
IMAGES_FROM_URLS = "url"
# The kinds reading Chinese-CLIP's layout: its own name, and the sets it distributes in it.
CN_CLIP_KINDS = ("cn_clip", "muge", "flickr30k_cn", "coco_cn")
# Region phrases of one image are joined into one caption with this, unless the recipe says.
DEFAULT_PHRASE_SEPARATOR = "; "


class CocoSource(StrictModel):
    """A COCO captions JSON (`images`, `annotations`): one row per caption, several per image."""

    name: SourceName
    kind: Literal["coco"]
    annotations: str = Field(description="the captions JSON, e.g. annotations/captions_train2014.json")
    images: str = Field(description="a folder holding images[].file_name, or 'url' (coco_url, else flickr_url)")

    @property
    def stores_images(self) -> bool:
        """Whether its images are written under the build's work/sources/ folder."""
        return self.images != IMAGES_FROM_URLS

    @property
    def several_captions(self) -> bool:
        """Rows of one image share its URL: dedup treats them as one image (stages/dedup.py)."""
        return True


class VisualGenomeSource(StrictModel):
    """Visual Genome region descriptions: an image's distinct phrases, in order, joined into one
    caption (the Chinese CLIP paper's use of them: one text per image)."""

    name: SourceName
    kind: Literal["visual_genome"]
    regions: str = Field(description="region_descriptions.json")
    images: str = Field(description="a folder holding {image_id}.jpg (subfolders searched), or 'url'")
    image_data: Optional[str] = Field(default=None, description="image_data.json (the URLs), for images: url")
    separator: str = Field(default=DEFAULT_PHRASE_SEPARATOR, min_length=1)
    max_phrases: Optional[int] = Field(default=None, ge=1, description="keep an image's first N distinct phrases")

    @field_validator("image_data")
    @classmethod
    def _given(cls, value: Optional[str]) -> Optional[str]:
        return value or None

    @model_validator(mode="after")
    def _urls_need_image_data(self) -> "VisualGenomeSource":
        if self.images == IMAGES_FROM_URLS and not self.image_data:
            raise ValueError("images: url reads the URLs from image_data.json; set image_data")
        return self

    @property
    def stores_images(self) -> bool:
        return self.images != IMAGES_FROM_URLS


class CnClipSource(StrictModel):
    """Chinese-CLIP's finetuning layout: `{split}_imgs.tsv` (image id, base64 image) and
    `{split}_texts.jsonl` (text_id, text, image_ids): one row per (text, image) pair. `muge`,
    `flickr30k_cn` and `coco_cn` are the same reader (Chinese-CLIP distributes them so)."""

    name: SourceName
    kind: Literal["cn_clip", "muge", "flickr30k_cn", "coco_cn"]
    path: str = Field(description="the folder holding {split}_imgs.tsv and {split}_texts.jsonl")
    split: Literal["train", "valid", "test"] = "train"

    @property
    def stores_images(self) -> bool:
        return True

    @property
    def several_captions(self) -> bool:
        return True


FORMAT_SOURCES = (CocoSource, VisualGenomeSource, CnClipSource)
FORMAT_KINDS = ("coco", "visual_genome", *CN_CLIP_KINDS)
