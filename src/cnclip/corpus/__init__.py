"""cnclip.corpus: build Chinese image-text corpora from (url, caption) lists.

    from cnclip.corpus import load_recipe, build
    funnel = build(load_recipe("recipes/demo.yaml"))
"""

from cnclip.corpus.pipeline import build, clean, run_dedup, run_download, run_shard, run_text
from cnclip.corpus.recipe import Recipe, RecipeError, load_recipe, parse_recipe
from cnclip.corpus.manifests.integrity import verify_corpus
from cnclip.corpus.manifests.stats import corpus_stats

__all__ = [
    "Recipe", "RecipeError", "build", "clean", "corpus_stats", "load_recipe", "parse_recipe", "run_dedup",
    "run_download", "run_shard", "run_text", "verify_corpus",
]
