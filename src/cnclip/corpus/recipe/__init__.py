"""Corpus recipes: the YAML that drives `cnclip corpus build`, parsed once into typed objects.

Everything downstream receives a `Recipe`; nothing deeper reads YAML. Validation errors name
the file, the key and what is wrong, one per line, and nothing runs.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal, Optional, Union

from pydantic import ByteSize, Field, PlainValidator, ValidationInfo, field_validator, model_validator

from cnclip._common.errors import CnclipError
from cnclip._common.strict import StrictModel, validate_mapping
from cnclip._common.yaml_loader import read_yaml
from cnclip.corpus.recipe.crawl import CrawlSettings, GuardSettings, HtmlSource, SourceName, UserAgentText, WarcSource
from cnclip.corpus.recipe.embed import EmbedSettings, FilterSettings, SemanticDedup
from cnclip.corpus.recipe.paths import recipe_path_problems
from cnclip.corpus.recipe.sources_formats import FORMAT_KINDS, CnClipSource, CocoSource, VisualGenomeSource
from cnclip.corpus.recipe.translate import TranslateSettings, translate_problems


# The column names a source may not keep are the build's own, derived from the declared tables
# (manifests/schemas.py, imported when first needed: it imports polars and the stages' modules
# import this one). `RESERVED_COLUMNS` is kept as a name for readers of the set.
def __getattr__(name: str) -> frozenset[str]:
    if name == "RESERVED_COLUMNS":
        from cnclip.corpus.manifests.schemas import reserved_columns

        return frozenset(reserved_columns())
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def keep_column_problem(names: list[str]) -> str | None:
    """Why these keep_columns cannot be kept (each that is a column the build writes or uses,
    by its index), or None."""
    from cnclip.corpus.manifests.schemas import reserved_columns

    reserved = reserved_columns()
    clash = [(index, name) for index, name in enumerate(names) if name in reserved]
    if not clash:
        return None
    where = "; ".join(f"keep_columns[{index}] {name!r} is {reserved[name]}" for index, name in clash)
    return f"names reserved by the manifests: {', '.join(name for _, name in clash)} ({where})"


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
        problem = keep_column_problem(value)
        if problem:
            raise ValueError(problem)
        return value


class SampleWebSource(StrictModel):
    """The built-in sample web: a seeded generated site served on 127.0.0.1 during the build."""

    name: SourceName
    kind: Literal["sample_web"]
    images: int = Field(default=300, ge=10, le=100_000)
    seed: int = 0
    # Not 0 ("any free port"): the port is part of every sample URL, written at ingest.
    port: int = Field(default=18765, ge=1, le=65535)


Source = Annotated[Union[MetadataSource, SampleWebSource, HtmlSource, WarcSource, CocoSource, VisualGenomeSource,
                         CnClipSource], Field(discriminator="kind")]
# The `kind` values above: pydantic's error locations name them, the user's key paths do not.
SOURCE_KINDS = ("metadata", "sample_web", "html", "warc", *FORMAT_KINDS)


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
    # Run by the embed stage, on its embeddings (stages/embed.py).
    semantic: Optional[SemanticDedup] = None


class ShardSettings(StrictModel):
    samples_per_shard: int = Field(default=10_000, ge=1, le=1_000_000)
    processes: Optional[int] = Field(default=None, ge=1, le=MAX_PROCESSES, description=_STAGE_PROCESSES)


# Spark masters a session can be built for: local threads, a standalone cluster, YARN, Kubernetes.
_SPARK_MASTER = re.compile(r"local|local\[(?:\*|[1-9][0-9]*)\]|spark://[^\s/:]+:[0-9]{1,5}|yarn|k8s://\S+")


def _conf_value(value: object) -> str:
    """A Spark setting as the text SparkConf holds (YAML's true -> "true"); lists and mappings are
    no Spark setting."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (str, int, float)):
        return str(value)
    raise ValueError("expected a text, number or true/false")


SparkConfValue = Annotated[str, PlainValidator(_conf_value)]


class EngineSettings(StrictModel):
    """Where the stages' per-part maps and global steps run (runtime/engine.py, spark_engine.py)."""

    kind: Literal["local", "spark"] = "local"
    processes: int = Field(default=2, ge=1, le=MAX_PROCESSES, description="worker processes of each per-part map")
    master: Optional[str] = Field(default=None, description="kind spark: local[N], local[*], spark://host:port, "
                                  "yarn or k8s://...; default local[*]")
    conf: dict[str, SparkConfValue] = Field(
        default_factory=dict, description="kind spark: settings handed to the SparkSession builder")

    @field_validator("master")
    @classmethod
    def _known_master(cls, value: Optional[str]) -> Optional[str]:
        if value is not None and not _SPARK_MASTER.fullmatch(value):
            raise ValueError("expected local[N], local[*], spark://host:port, yarn or k8s://<api server>")
        return value

    @model_validator(mode="after")
    def _spark_keys(self) -> "EngineSettings":
        """master and conf configure a SparkSession: on the local engine they would be ignored.
        (Their empty values pass: a dumped recipe, which spells every key out, must load again.)"""
        if self.kind != "spark":
            given = [key for key in ("master", "conf") if getattr(self, key)]
            if given:
                raise ValueError(f"{given[0]} is a setting of kind: spark (kind is {self.kind})")
        return self


def _location(value: object) -> Path | str:
    """A local folder as a Path; an fsspec URL (s3://bucket/prefix) kept as text, which a Path
    would collapse (`s3:/bucket`)."""
    from cnclip.corpus.runtime.storage import is_url

    if isinstance(value, str) and is_url(value):
        return value.rstrip("/")
    if isinstance(value, (str, Path)):
        return Path(value)
    raise ValueError("expected a folder path or a URL")


# A folder the build publishes into: a local path or an fsspec URL (staged under work_dir).
Location = Annotated[Union[Path, str], PlainValidator(_location)]


# Spark reads and writes the work parts through its own Hadoop filesystems, which know s3:// (or
# gs://) only with a connector this project does not ship; its tasks open them as plain paths.
SPARK_URL_WORK_DIR = ("engine.kind spark with a URL work_dir: the Spark engine reads and writes work parts "
                      "as paths every executor sees, not through fsspec; give work_dir a local folder every "
                      "executor mounts at the same path (NFS, a mounted HDFS or bucket) and keep output_dir "
                      "and manifest_dir on the URL (published after the build)")


# Source kinds that generate or crawl into local folders under the build (sample_web/, work/crawl/).
_LOCAL_WORK_KINDS = ("sample_web", "html", "warc")


class Recipe(StrictModel):
    name: str
    output_dir: Location
    manifest_dir: Location
    # When output_dir or manifest_dir is a URL: a local folder for the work files and a staged copy
    # of what is published, or a URL, whose work/ every stage reads and writes in place.
    work_dir: Optional[Location] = None
    sources: list[Source] = Field(min_length=1)
    text: TextSettings = Field(default_factory=TextSettings)
    image: ImageSettings = Field(default_factory=ImageSettings)
    download: DownloadSettings = Field(default_factory=DownloadSettings)
    dedup: DedupSettings = Field(default_factory=DedupSettings)
    crawl: CrawlSettings = Field(default_factory=CrawlSettings)
    shard: ShardSettings = Field(default_factory=ShardSettings)
    engine: EngineSettings = Field(default_factory=EngineSettings)
    embed: Optional[EmbedSettings] = None
    filter: FilterSettings = Field(default_factory=FilterSettings)
    translate: Optional[TranslateSettings] = None

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
        from cnclip.corpus.runtime.storage import is_url

        if "output_dir" in info.data and not (is_url(value) or is_url(info.data["output_dir"])):
            problem = BuildLayout(info.data["output_dir"], value).nesting_problem()
            if problem:
                raise ValueError(problem)
        return value

    @field_validator("engine")
    @classmethod
    def _spark_work_dir(cls, value: EngineSettings, info: ValidationInfo) -> EngineSettings:
        """A URL work_dir is read by the stages through fsspec; Spark's tasks cannot (see the text)."""
        from pydantic_core import PydanticCustomError

        from cnclip.corpus.runtime.storage import is_url

        work_dir = info.data.get("work_dir")
        if value.kind == "spark" and work_dir is not None and is_url(work_dir):
            raise PydanticCustomError("spark_work_dir", SPARK_URL_WORK_DIR)
        return value

    @model_validator(mode="after")
    def _local_work_dir(self) -> "Recipe":
        """A URL output needs a work_dir: a local folder, or a URL beside a URL output."""
        from cnclip.corpus.runtime.layout import BuildLayout
        from cnclip.corpus.runtime.storage import is_url

        remote = [key for key in ("output_dir", "manifest_dir") if is_url(getattr(self, key))]
        if not remote:
            if self.work_dir is not None:
                raise ValueError("work_dir is only for a URL output_dir or manifest_dir; work files go in "
                                 "<output_dir>/work")
            return self
        if self.work_dir is None:
            raise ValueError(f"{remote[0]} is a URL: set work_dir to a local folder for the work files "
                             "(or to a URL, to keep them on the object store)")
        if remote == ["output_dir"]:
            raise ValueError("output_dir is a URL: manifest_dir must be one too (the manifests name the shards)")
        if is_url(self.work_dir):
            if remote != ["output_dir", "manifest_dir"]:
                raise ValueError("work_dir is a URL: output_dir must be one too (the stages write the shards "
                                 "in place)")
            local = [f"sources[{i}] ({s.kind})" for i, s in enumerate(self.sources)
                     if s.kind in _LOCAL_WORK_KINDS or getattr(s, "stores_images", False)]
            if local:
                raise ValueError(f"work_dir is a URL: {local[0]} writes its pages or images to a local "
                                 "folder; give work_dir a local folder")
            return self
        problem = BuildLayout.of(self).nesting_problem()
        if problem:
            raise ValueError(problem)
        return self

    def settings(self, section: str) -> dict:
        """A section's settings that shape its outputs (parallelism excluded), for fingerprints."""
        value = getattr(self, section)
        if value is None:  # an optional section left out
            return {}
        if isinstance(value, list):
            dumped = [v.model_dump(mode="json") for v in value]
        else:
            dumped = value.model_dump(mode="json")
        if isinstance(dumped, dict):
            # memory_budget only changes the threads, never what is downloaded.
            dumped = {k: v for k, v in dumped.items() if k not in ("processes", "threads", "memory_budget")}
        return dumped


def embeddings_problems(recipe: Recipe) -> list[str]:
    """The steps that read the embed stage's embeddings, asked for without an embed section."""
    if recipe.embed is not None:
        return []
    wanted = [key for key, value in (("filter.clip_score", recipe.filter.clip_score),
                                     ("dedup.semantic", recipe.dedup.semantic)) if value is not None]
    return [f"{key}: needs an embed section (embed.model: the model that scores the pairs)" for key in wanted]


def parse_recipe(data: dict, origin: str = "<recipe>", check_paths: bool = True) -> Recipe:
    """Validate recipe data; with `check_paths`, every local file or folder it names must exist
    too (relative to the working directory), so a typo stops the build before any stage runs."""
    recipe = validate_mapping(Recipe, data, origin, RecipeError, union_tags=SOURCE_KINDS)
    unembedded = embeddings_problems(recipe) + translate_problems(recipe.translate, [s.name for s in recipe.sources])
    if unembedded:
        raise RecipeError("\n".join(f"{origin}: {problem}" for problem in unembedded))
    if check_paths:
        problems = recipe_path_problems(recipe)
        if problems:
            raise RecipeError("\n".join(f"{origin}: {problem}" for problem in problems))
    return recipe


def load_recipe(path: str | Path, check_paths: bool = True) -> Recipe:
    """A recipe file, validated; `check_paths=False` for readers of a finished build's outputs
    (training from `data.corpus`), which need not have the build's inputs at hand."""
    return parse_recipe(read_yaml(path, RecipeError, "recipe"), str(path), check_paths=check_paths)
