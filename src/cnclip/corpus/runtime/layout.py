"""Where each stage reads and writes: one place that knows the build's folder layout.

Locally every path is a Path. A recipe whose work_dir is a URL builds on the object store
itself: its work files under `<work_dir>/work`, its shards and manifests straight into the URL
output_dir and manifest_dir; those paths are then URL strings (storage.join), and the stages
read and write them through runtime/storage.py and commit.py only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from cnclip.corpus.runtime import storage

if TYPE_CHECKING:  # recipe.py checks layouts at load time, so this import stays one-way
    from cnclip.corpus.recipe import Recipe


def at(root: Path | str, *names: str) -> Path | str:
    """`root/names...`: a Path under a local root, a URL string under a URL root."""
    return storage.join(root, *names) if storage.is_url(root) else Path(root).joinpath(*names)


@dataclass(frozen=True)
class BuildLayout:
    output_dir: Path | str
    manifest_dir: Path | str
    # Where work/ lies when it is not under output_dir: a URL work_dir (the output is a URL too).
    work_root: Optional[str] = None
    # Whether the build publishes embeddings/ (a recipe with an embed section), which it then owns.
    embeds: bool = False

    @classmethod
    def of(cls, recipe: Recipe) -> "BuildLayout":
        from cnclip.corpus.runtime.publish import local_roots  # a URL output is staged under work_dir

        embeds = recipe.embed is not None
        if storage.is_url(str(recipe.work_dir or "")):
            return cls(recipe.output_dir, recipe.manifest_dir, str(recipe.work_dir), embeds)
        return cls(*local_roots(recipe), embeds=embeds)

    @property
    def remote(self) -> bool:
        """Whether the stages write straight to URLs (nothing is staged locally to publish)."""
        return self.work_root is not None

    @property
    def work(self) -> Path | str:
        return at(self.work_root if self.work_root is not None else self.output_dir, "work")

    @property
    def lock_root(self) -> Path | str:
        """The folder whose build lock keeps other builds out (the one work/ lies in)."""
        return self.work_root if self.work_root is not None else self.output_dir

    # ingest: one Parquet part per input file; every work file's columns: manifests/schemas.py,
    # listed in manifests/README.md ("Work files")
    @property
    def ingest_dir(self) -> Path | str:
        return at(self.work, "ingest")

    # translate (a recipe with a translate section): each translated source's ingest parts with
    # their captions translated, the captions sent to the backend, and the default cache
    @property
    def translate_dir(self) -> Path | str:
        return at(self.work, "translate")

    @property
    def translate_parts_dir(self) -> Path | str:
        return at(self.translate_dir, "parts")

    @property
    def translate_cache_dir(self) -> Path | str:
        return at(self.work, "translate-cache")

    # text: normalized parts (every row, with its reason), then accepted/ and rejected/ parts
    # the dataset kinds' rows and stored images (coco, visual_genome, cn_clip): one folder a source
    @property
    def sources_dir(self) -> Path | str:
        return at(self.work, "sources")

    @property
    def text_dir(self) -> Path | str:
        return at(self.work, "text")

    @property
    def text_accepted_dir(self) -> Path | str:
        return at(self.text_dir, "accepted")

    @property
    def text_rejected_dir(self) -> Path | str:
        return at(self.text_dir, "rejected")

    # download: img2dataset's own output folder (tar + parquet + stats per part)
    @property
    def download_dir(self) -> Path | str:
        return at(self.work, "download")

    # what img2dataset reads: the text stage's accepted rows, URLs as browsers send them
    @property
    def download_input_dir(self) -> Path | str:
        return at(self.work, "download-input")

    @property
    def hash_dir(self) -> Path | str:
        return at(self.work, "hash")

    @property
    def dedup_dir(self) -> Path | str:
        return at(self.work, "dedup")

    @property
    def dedup_decisions(self) -> Path | str:
        return at(self.dedup_dir, "decisions.parquet")

    # embed: one embeddings part per download part (+ model.json), its members and decisions beside it
    @property
    def embed_dir(self) -> Path | str:
        return at(self.work, "embed")

    @property
    def embed_scores_dir(self) -> Path | str:
        return at(self.work, "embed-scores")

    @property
    def embed_members(self) -> Path | str:
        return at(self.work, "embed-members.parquet")

    @property
    def embed_decisions(self) -> Path | str:
        return at(self.work, "embed-decisions.parquet")

    # semantic dedup's steps (with dedup.semantic): the sample's candidates, the centroids, each
    # part's rows with their cluster, each group of clusters' decisions
    @property
    def embed_semantic_dir(self) -> Path | str:
        return at(self.work, "embed-semantic")

    @property
    def shard_work_dir(self) -> Path | str:
        return at(self.work, "shard")

    @property
    def shard_plan(self) -> Path | str:
        return at(self.shard_work_dir, "plan.parquet")

    @property
    def sample_web_dir(self) -> Path | str:
        return at(self.output_dir, "sample_web")

    @property
    def shards_dir(self) -> Path | str:
        return at(self.output_dir, "shards")

    @property
    def samples_dir(self) -> Path | str:
        return at(self.manifest_dir, "samples")

    @property
    def rejected_dir(self) -> Path | str:
        return at(self.manifest_dir, "rejected")

    # the published embeddings, one part per shard (+ model.json): builds with an embed section only
    @property
    def embeddings_dir(self) -> Path | str:
        return at(self.manifest_dir, "embeddings")

    @property
    def funnel_path(self) -> Path | str:
        return at(self.manifest_dir, "funnel.json")

    # the HTML report the build writes last (cnclip/report/corpus.py); not a published file, no
    # stage's output: clean and --fresh remove it with the stages' outputs (pipeline.py)
    @property
    def report_path(self) -> Path | str:
        return at(self.manifest_dir, "report.html")

    # every published file's size and SHA-256 (integrity.py)
    @property
    def checksums_path(self) -> Path | str:
        return at(self.manifest_dir, "checksums.json")

    # What the build creates in each folder: all that `--fresh` may ever remove (ownership.py).
    @property
    def output_entries(self) -> tuple[Path | str, ...]:
        return (self.work, self.shards_dir, self.sample_web_dir)

    @property
    def manifest_entries(self) -> tuple[Path | str, ...]:
        embeddings = (self.embeddings_dir,) if self.embeds else ()
        return (self.samples_dir, self.rejected_dir, *embeddings, self.funnel_path, self.checksums_path)

    def nesting_problem(self) -> str | None:
        """Why these folders would destroy each other's files, or None.

        A stage that is redone empties its folders (work/, shards/, samples/, rejected/): a
        manifest_dir inside the output's work/, shards/ or sample_web/, or an output_dir inside
        samples/ or rejected/, would be deleted with them (or published inside them).
        """
        if self.remote:
            return None  # URL prefixes: published_ownership.py checks what each may hold
        output, manifests = self.output_dir.resolve(), self.manifest_dir.resolve()
        for inner, name, outer in ((manifests, "manifest_dir", self.output_entries),
                                   (output, "output_dir", self.manifest_entries)):
            for folder in outer:
                folder = folder.resolve()
                if inner == folder or folder in inner.parents:
                    return f"{name} ({inner}) is inside {folder}, which the build empties and rewrites"
        return None  # otherwise nested or shared folders are fine: their entries do not collide
