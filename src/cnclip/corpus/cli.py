"""`cnclip corpus ...`: a thin Typer layer over cnclip.corpus's Python API.

The pipeline, the manifests and the hashing load polars and numpy; each command imports them when
it runs, so `cnclip --help` and a recipe error return without loading them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from cnclip._common.console import HELP_OPTIONS, error
from cnclip._common.errors import CnclipError
from cnclip._common.strict import validate_mapping
from cnclip.corpus.recipe import ImageSettings, RecipeError, load_recipe

app = typer.Typer(help="Build Chinese image-text corpora: ingest, text, download, dedup, shard.", no_args_is_help=True,
                  context_settings=HELP_OPTIONS, pretty_exceptions_show_locals=False)

RecipeArg = typer.Argument(..., help="corpus recipe (YAML), e.g. recipes/demo.yaml", exists=False)


def _pipeline():
    from cnclip.corpus import pipeline

    return pipeline


def _run(step, recipe_path: Path):
    try:
        recipe = load_recipe(recipe_path)
        return step(recipe)
    except CnclipError as err:  # a user's mistake: one line; anything else is a bug and keeps its traceback
        error(str(err))
        raise typer.Exit(2) from None


@app.command()
def build(
    recipe: Path = RecipeArg,
    fresh: bool = typer.Option(False, "--fresh", help="discard earlier outputs of this recipe and start over"),
) -> None:
    """Run every stage: ingest + text, download, hash + dedup, shard; print the funnel.

    Rerunning an interrupted build resumes it; stages whose settings changed are redone.

    Example: cnclip corpus build recipes/demo.yaml
    """
    _run(lambda r: _pipeline().build(r, fresh=fresh), recipe)


@app.command()
def text(recipe: Path = RecipeArg) -> None:
    """Ingest the sources, translate the English ones (a recipe with `translate:`) and run the text
    stage (normalize, filter, collapse duplicates, cap).

    Example: cnclip corpus text recipes/laion-zh.yaml
    """
    _run(lambda r: _pipeline().run_text(r), recipe)


@app.command()
def download(
    recipe: Path = RecipeArg,
    retry_failed: bool = typer.Option(False, "--retry-failed",
                                      help="fetch again only rows that failed for a transient reason "
                                           "(timeouts, 5xx, 429, DNS, refused connections)"),
) -> None:
    """Download the rows the text stage accepted, with img2dataset behind the network guard.

    Example: cnclip corpus download recipes/laion-zh.yaml --retry-failed
    """
    _run(lambda r: _pipeline().run_download(r, retry_failed=retry_failed), recipe)


@app.command()
def dedup(recipe: Path = RecipeArg) -> None:
    """pHash the downloaded images and drop exact, near-duplicate and evaluation-overlap rows.

    Example: cnclip corpus dedup recipes/laion-zh.yaml
    """
    _run(lambda r: _pipeline().run_dedup(r), recipe)


@app.command("hash-eval")
def hash_eval(
    path: str = typer.Argument(..., help="a folder of images, a WebDataset tar or a glob of tars"),
    out: Path = typer.Option(..., "--out", help="the pHash list to write (Parquet)"),
    size: int = typer.Option(224, help="image.size of the recipes that will use the list"),
    resize_mode: str = typer.Option("center_crop", help="image.resize_mode of those recipes"),
) -> None:
    """Write a pHash list of an evaluation set, for a recipe's dedup.eval_images.

    Images are resized as the corpus stores them, so lists are only valid for that size and mode.

    Example: cnclip corpus hash-eval data/coco-cn/val2014 --out evalsets/coco-cn.parquet
    """
    from cnclip.corpus.ops.eval_hashes import write_eval_hashes

    try:
        settings = validate_mapping(ImageSettings, {"size": size, "resize_mode": resize_mode}, "hash-eval",
                                    RecipeError)
        count = write_eval_hashes(path, out, settings)
    except CnclipError as err:
        error(str(err).splitlines()[0])
        raise typer.Exit(2) from None
    typer.echo(f"{count} pHashes -> {out}")


@app.command()
def evalset(
    kind: str = typer.Argument(..., help="coco, cn_clip, muge, flickr30k_cn or coco_cn"),
    path: str = typer.Argument(..., help="coco: the captions JSON; the others: the folder of "
                                         "{split}_imgs.tsv and {split}_texts.jsonl"),
    out: Path = typer.Option(..., "--out", help="the folder to write (clip_benchmark's WebDataset layout)"),
    split: str = typer.Option("test", "--split", help="the split folder to write (cn_clip kinds: the split read)"),
    images: Optional[str] = typer.Option(None, "--images", help="coco: the folder holding images[].file_name"),
    samples_per_shard: int = typer.Option(1000, "--samples-per-shard", min=1),
    size: int = typer.Option(224, help="pHash list: image.size of the recipes that will use it"),
    resize_mode: str = typer.Option("center_crop", help="pHash list: image.resize_mode of those recipes"),
) -> None:
    """Write an evaluation set: one sample per image with all its captions ({key}.txt lines),
    OUT/{split}/N.tar, nshards.txt, sizes.json, phashes.parquet (for dedup.eval_images) and
    OUT/dataset_type.txt. Read by `cnclip eval --data 'OUT/test/*.tar'` and clip_benchmark.

    Example: cnclip corpus evalset flickr30k_cn data/Flickr30k-CN --split test --out evalsets/flickr30k-cn
    """
    from cnclip.evalsets import write_evalset

    try:
        settings = validate_mapping(ImageSettings, {"size": size, "resize_mode": resize_mode}, "evalset",
                                    RecipeError)
        summary = write_evalset(kind, path, out, split, images, samples_per_shard, settings)
    except CnclipError as err:
        error(str(err).splitlines()[0])
        raise typer.Exit(2) from None
    skipped = f"; {summary.skipped} input row(s) left out (first: {summary.skipped_details[0]})" \
        if summary.skipped else ""
    typer.echo(f"{summary.images} images, {summary.captions} captions in {summary.shards} shard(s) -> "
               f"{out / split}{skipped}")


@app.command()
def shard(recipe: Path = RecipeArg) -> None:
    """Write the final WebDataset shards, samples/ and rejected/ manifests and funnel.json.

    Example: cnclip corpus shard recipes/laion-zh.yaml
    """
    _run(lambda r: _pipeline().run_shard(r), recipe)


@app.command()
def verify(
    manifest_dir: str = typer.Argument(..., help="a build's manifest_dir, e.g. manifests/demo or "
                                                 "s3://bucket/manifests/demo"),
    shards_dir: Optional[str] = typer.Option(None, "--shards-dir",
                                             help="where the shards are, if moved since the build"),
) -> None:
    """Check a built corpus: every published file (tars, sizes.json, manifest parts, funnel.json)
    against the sizes and SHA-256 in checksums.json, each tar's members against its samples/ part,
    and samples + rejected = input rows. Local folders or fsspec URLs (s3://, gs://...).

    Exits 0 when intact; 2 with one line per problem.

    Example: cnclip corpus verify manifests/demo
    """
    from cnclip.corpus.manifests.integrity import intact_summary, verify_corpus

    problems = verify_corpus(manifest_dir, shards_dir)
    for problem in problems:
        error(problem)
    if problems:
        raise typer.Exit(2)
    typer.echo(intact_summary(manifest_dir))


@app.command()
def report(
    manifest_dir: Path = typer.Argument(..., help="a built corpus's manifest_dir, e.g. manifests/demo"),
    out: Optional[Path] = typer.Option(None, "--out", help="the HTML file to write (default MANIFEST_DIR/report.html)"),
    recipe: Optional[Path] = typer.Option(None, "--recipe", help="the corpus recipe, to show the build's settings"),
) -> None:
    """Write one self-contained HTML page about a built corpus: the funnel, sources,
    distributions, sample thumbnails, examples of every reject reason and the settings. It opens
    offline (charts and images are inline).

    Example: cnclip corpus report manifests/demo --out demo-report.html
    """
    from cnclip.report.corpus import write_corpus_report

    try:
        settings = load_recipe(recipe).model_dump(mode="json") if recipe else None
        path = write_corpus_report(manifest_dir, out, settings=settings)
    except CnclipError as err:
        error(str(err))
        raise typer.Exit(2) from None
    typer.echo(f"report -> {path}")


@app.command()
def stats(
    manifest_dir: str = typer.Argument(..., help="a build's manifest_dir, e.g. manifests/demo or "
                                                 "s3://bucket/manifests/demo"),
    as_json: bool = typer.Option(False, "--json", help="print the figures as JSON instead of tables"),
) -> None:
    """Counts, the funnel, caption-length and image-size distributions of a built corpus (a local
    manifest_dir or an fsspec URL).

    Example: cnclip corpus stats manifests/demo
    """
    from cnclip.corpus.manifests.stats import corpus_stats, print_stats

    try:
        figures = corpus_stats(manifest_dir)
    except CnclipError as err:
        error(str(err))
        raise typer.Exit(2) from None
    if as_json:
        typer.echo(json.dumps(figures, ensure_ascii=False, indent=2))
    else:
        print_stats(figures)


@app.command("export-cn-clip")
def export_cn_clip(
    manifest_dir: Path = typer.Argument(..., help="a built corpus's manifest_dir, e.g. manifests/demo"),
    out: Path = typer.Argument(..., help="the folder to write (new, empty, or an earlier export)"),
    split: str = typer.Option("train", "--split", help="the split name of the exported samples"),
    valid_fraction: float = typer.Option(0.0, "--valid-fraction",
                                         help="hold out this fraction of the images as split 'valid'"),
    seed: int = typer.Option(0, "--seed", help="the held-out images' seed"),
) -> None:
    """Write the corpus in Chinese-CLIP's finetuning layout: {split}_imgs.tsv (base64 images),
    {split}_texts.jsonl and {split}_ids.parquet (the ids' manifest uid and key), for its
    cn_clip/preprocess/build_lmdb_dataset.py.

    Example: cnclip corpus export-cn-clip manifests/demo cn-data --valid-fraction 0.05
    """
    from cnclip.corpus.manifests.export_cn_clip import export_cn_clip as run_export

    try:
        counts = run_export(manifest_dir, out, split=split, valid_fraction=valid_fraction, seed=seed)
    except CnclipError as err:
        error(str(err))
        raise typer.Exit(2) from None
    shown = ", ".join(f"{name}: {c['images']} images, {c['texts']} texts" for name, c in counts.items())
    typer.echo(f"{shown} -> {out} (then: python -m cn_clip.preprocess.build_lmdb_dataset "
               f"--data_dir {out} --splits {','.join(counts)})")
