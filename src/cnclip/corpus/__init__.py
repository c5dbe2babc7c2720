"""cnclip.corpus: build Chinese image-text corpora from (url, caption) lists.

    from cnclip.corpus import load_recipe, build
    funnel = build(load_recipe("recipes/demo.yaml"))

The names below load on first use, so importing a subpackage (`cnclip.corpus.recipe`, the CLI for
`cnclip --help`) does not pull in polars, numpy or torch through the pipeline.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "Recipe", "RecipeError", "build", "clean", "corpus_stats", "load_recipe", "parse_recipe", "run_dedup",
    "run_download", "run_shard", "run_text", "verify_corpus",
]

_LAZY = {
    "build": "pipeline", "clean": "pipeline", "run_dedup": "pipeline", "run_download": "pipeline",
    "run_shard": "pipeline", "run_text": "pipeline",
    "Recipe": "recipe", "RecipeError": "recipe", "load_recipe": "recipe", "parse_recipe": "recipe",
    "verify_corpus": "manifests.integrity", "corpus_stats": "manifests.stats",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from importlib import import_module

        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(name)
