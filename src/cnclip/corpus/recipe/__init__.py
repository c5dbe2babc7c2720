"""Corpus recipes: the YAML that drives `cnclip corpus build`, parsed once into typed objects.

Everything downstream receives a `Recipe`; nothing deeper reads YAML. Validation errors name
the file, the key and what is wrong, one per line, and nothing runs.
"""

from __future__ import annotations

import reprlib
from pathlib import Path
from typing import Annotated, Literal, Optional, Union

from pydantic import BaseModel, ByteSize, Field, ValidationError, ValidationInfo, field_validator, model_validator

from cnclip._common.errors import CnclipError
from cnclip._common.strict import StrictModel

from cnclip.corpus.recipe.crawl import CrawlSettings, GuardSettings, HtmlSource, SourceName, UserAgentText, WarcSource
from cnclip.corpus.recipe.paths import recipe_path_problems
from cnclip._common.yaml_loader import read_yaml  # noqa: F401 (src/cnclip/train/config.py reads its YAML through here too)

# Columns the pipeline owns (the manifests' schemas in manifest_schema.py, the work columns of the
# download and dedup stages, img2dataset's own parquet columns); a source may not carry extra
# columns under these names, nor under the prefixes below, or they would shadow or be dropped.
RESERVED_COLUMNS = frozenset(
    {
        "uid", "source", "row", "url", "caption", "caption_raw", "stage", "reason", "detail",
        "key", "shard", "width", "height", "original_width", "original_height", "sha256",
        "phash", "duplicate_of", "duplicate_of_uid", "status", "error_message", "exif",
    }
)
RESERVED_PREFIXES = ("download_", "_")


# Worker processes per stage: more than any one machine has cores is a typo, not a plan.
MAX_PROCESSES = 1024
# A stage's own `processes` wins over engine.processes for that stage's per-part maps.
_STAGE_PROCESSES = "worker processes for this stage (default: engine.processes)"


class RecipeError(CnclipError, ValueError):
    """A recipe that cannot run; the message names the file and the key."""


class MetadataSource(StrictModel):
    """Rows of (url, caption) from Parquet / CSV / TSV / JSONL files (LAION, Wukong, your own)."""

    name: SourceName
    kind: Literal["metadata"]
    path: str = Field(description="local path, glob, or fsspec URL")
    format: Literal["auto", "parquet", "csv", "tsv", "jsonl"] = "auto"
    url_column: str = "url"
    caption_column: str = "caption"
    where: Optional[str] = Field(default=None, description="polars SQL row filter")
    keep_columns: list[str] = Field(default_factory=list)

    @field_validator("keep_columns")
    @classmethod
    def _no_reserved(cls, value: list[str]) -> list[str]:
        clash = sorted(n for n in value if n in RESERVED_COLUMNS or n.startswith(RESERVED_PREFIXES))
        if clash:
            raise ValueError(f"names reserved by the manifests: {', '.join(clash)}")
        return value


class SampleWebSource(StrictModel):
    """The built-in sample web: a seeded generated site served on 127.0.0.1 during the build."""

    name: SourceName
    kind: Literal["sample_web"]
    images: int = Field(default=300, ge=10, le=100_000)
    seed: int = 0
    # Not 0 ("any free port"): the port is part of every sample URL, written at ingest.
    port: int = Field(default=18765, ge=1, le=65535)


Source = Annotated[Union[MetadataSource, SampleWebSource, HtmlSource, WarcSource], Field(discriminator="kind")]


class TextSettings(StrictModel):
    min_chars: int = Field(default=5, ge=0)
    max_chars: int = Field(default=50, ge=1)
    min_cjk_ratio: float = Field(default=0.5, ge=0.0, le=1.0)
    max_caption_repeats: Optional[int] = Field(default=10, ge=1)
    blacklist: Optional[str] = None
    default_blacklist: bool = True
    opencc_config: Optional[str] = "t2s"
    reject_filenames: bool = True
    dedup_pairs: bool = True
    processes: Optional[int] = Field(default=None, ge=1, le=MAX_PROCESSES, description=_STAGE_PROCESSES)

    @model_validator(mode="after")
    def _lengths(self) -> "TextSettings":
        if self.min_chars > self.max_chars:
            raise ValueError(f"min_chars ({self.min_chars}) is larger than max_chars ({self.max_chars})")
        return self


class ImageSettings(StrictModel):
    size: int = Field(default=224, ge=8, le=8192)
    resize_mode: Literal["no", "keep_ratio", "keep_ratio_largest", "center_crop", "border"] = "center_crop"
    min_side: int = Field(default=64, ge=0)
    max_aspect_ratio: float = Field(default=3.0, ge=1.0)
    # PIL's own decompression-bomb threshold; also handed to OpenCV so oversize images are refused
    # from their header, before any pixel memory is allocated.
    max_pixels: int = Field(default=89_478_485, ge=1)
    encode_format: Literal["jpg", "png", "webp"] = "jpg"
    encode_quality: int = Field(default=95, ge=0, le=100)

    @model_validator(mode="after")
    def _png_compression(self) -> "ImageSettings":
        if self.encode_format == "png" and self.encode_quality > 9:
            raise ValueError("for png, encode_quality is the compression level 0-9")
        return self


class DownloadSettings(GuardSettings):
    """img2dataset's settings, plus the network guard and per-host politeness it runs behind."""

    processes: int = Field(default=2, ge=1, le=MAX_PROCESSES)
    threads: int = Field(default=16, ge=1, le=1024)
    timeout: int = Field(default=10, ge=1)
    retries: int = Field(default=1, ge=0)
    samples_per_part: int = Field(default=10_000, ge=1, le=1_000_000)
    user_agent_token: Optional[UserAgentText] = "cnclip"
    disallowed_header_directives: list[str] = Field(
        default_factory=lambda: ["noai", "noimageai", "noindex", "noimageindex"]
    )
    allow_local_files: list[str] = Field(
        default_factory=list, description="folders file:// URLs may read regular files from (none: file:// rejected)")
    memory_budget: Optional[ByteSize] = Field(
        default=None, description="bytes (or '8GiB') the download may use; fewer threads, or refused, if over")

    @field_validator("allow_local_files")
    @classmethod
    def _existing_folders(cls, value: list[str]) -> list[str]:
        missing = [folder for folder in value if not Path(folder).is_dir()]
        if missing:
            raise ValueError(f"not an existing folder: {missing[0]!r}")
        return value


class DedupSettings(StrictModel):
    exact: bool = True
    near: bool = True
    phash_max_distance: int = Field(default=4, ge=0, le=16)
    text: bool = False
    text_max_distance: int = Field(default=12, ge=0, le=32)
    eval_images: list[str] = Field(default_factory=list)
    processes: Optional[int] = Field(default=None, ge=1, le=MAX_PROCESSES, description=_STAGE_PROCESSES)


class ShardSettings(StrictModel):
    samples_per_shard: int = Field(default=10_000, ge=1, le=1_000_000)
    processes: Optional[int] = Field(default=None, ge=1, le=MAX_PROCESSES, description=_STAGE_PROCESSES)


class EngineSettings(StrictModel):
    """Where the stages' per-part maps and global steps run (runtime/engine.py)."""

    kind: Literal["local"] = "local"
    processes: int = Field(default=2, ge=1, le=MAX_PROCESSES, description="worker processes of each per-part map")


class Recipe(StrictModel):
    name: str
    output_dir: Path
    manifest_dir: Path
    sources: list[Source] = Field(min_length=1)
    text: TextSettings = Field(default_factory=TextSettings)
    image: ImageSettings = Field(default_factory=ImageSettings)
    download: DownloadSettings = Field(default_factory=DownloadSettings)
    dedup: DedupSettings = Field(default_factory=DedupSettings)
    crawl: CrawlSettings = Field(default_factory=CrawlSettings)
    shard: ShardSettings = Field(default_factory=ShardSettings)
    engine: EngineSettings = Field(default_factory=EngineSettings)

    @model_validator(mode="after")
    def _unique_source_names(self) -> "Recipe":
        names = [s.name for s in self.sources]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"source names must be unique, repeated: {', '.join(dupes)}")
        return self

    @model_validator(mode="after")
    def _download_memory(self) -> "Recipe":
        """A memory budget that one download thread per process already exceeds runs nothing."""
        from pydantic_core import PydanticCustomError

        from cnclip.corpus.runtime.memory import threads_within_budget

        d = self.download
        try:
            threads_within_budget(d.processes, d.threads, self.image.max_pixels, d.max_response_bytes,
                                  d.memory_budget)
        except ValueError as err:
            raise PydanticCustomError("memory_budget", str(err)) from None
        return self

    @field_validator("manifest_dir")
    @classmethod
    def _folders_apart(cls, value: Path, info: ValidationInfo) -> Path:
        from cnclip.corpus.runtime.layout import BuildLayout

        if "output_dir" in info.data:
            problem = BuildLayout(info.data["output_dir"], value).nesting_problem()
            if problem:
                raise ValueError(problem)
        return value

    def settings(self, section: str) -> dict:
        """A section's settings that shape its outputs (parallelism excluded), for fingerprints."""
        value = getattr(self, section)
        dumped = [v.model_dump(mode="json") for v in value] if isinstance(value, list) else value.model_dump(mode="json")
        if isinstance(dumped, dict):
            # memory_budget only changes the threads, never what is downloaded.
            dumped = {k: v for k, v in dumped.items() if k not in ("processes", "threads", "memory_budget")}
        return dumped


def _format_location(loc: tuple) -> str:
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        elif item in ("metadata", "sample_web", "html", "warc") and parts and parts[-1].startswith("["):
            continue  # pydantic's discriminator tag, not a key the user wrote
        else:
            parts.append(("." if parts else "") + str(item))
    return "".join(parts) or "(top level)"


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxdict, _REPR.maxlist, _REPR.maxtuple, _REPR.maxset = 2, 4, 4, 4, 4
_REPR.maxstring = _REPR.maxother = 60


def _short_repr(value: object) -> str:
    """At most 60 characters, at a cost bounded whatever the input's size (reprlib stops early;
    a plain repr of a large list would build all of it first)."""
    return _REPR.repr(value)[:60]


def format_validation_error(origin: str, error: ValidationError) -> str:
    lines = []
    for err in error.errors():
        where = _format_location(err["loc"])
        message = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
        if err["type"] not in ("missing", "extra_forbidden") and "input" in err:
            message += f" (got {_short_repr(err['input'])})"
        lines.append(f"{origin}: {where}: {message}")
    return "\n".join(lines)


def validate_mapping(model: type[BaseModel], data: object, origin: str, error: type[Exception]):
    """Validate YAML data against a schema; problems become one `error` naming origin and keys."""
    if not isinstance(data, dict):
        raise error(f"{origin}: expected a mapping of keys at the top level")
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise error(format_validation_error(origin, err)) from None


def parse_recipe(data: dict, origin: str = "<recipe>", check_paths: bool = True) -> Recipe:
    """Validate recipe data; with `check_paths`, every local file or folder it names must exist
    too (relative to the working directory), so a typo stops the build before any stage runs."""
    recipe = validate_mapping(Recipe, data, origin, RecipeError)
    if check_paths:
        problems = recipe_path_problems(recipe)
        if problems:
            raise RecipeError("\n".join(f"{origin}: {problem}" for problem in problems))
    return recipe


def load_recipe(path: str | Path, check_paths: bool = True) -> Recipe:
    """A recipe file, validated; `check_paths=False` for readers of a finished build's outputs
    (training from `data.corpus`), which need not have the build's inputs at hand."""
    return parse_recipe(read_yaml(path, RecipeError, "recipe"), str(path), check_paths=check_paths)
