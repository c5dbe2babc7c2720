"""cnclip.search: a vector index over a built corpus's embeddings, and text or image search in it.

    from cnclip.search import search
    hits = search("manifests/demo", text="红色的圆形", top=10)

index.py builds and checks the faiss index under MANIFEST_DIR/index/; query.py answers queries
with the model that embedded the corpus; serve.py is the local web page (`cnclip search --serve`).
"""

from __future__ import annotations

# Loaded on first use: `cnclip --help` imports this package's cli without numpy, polars or faiss.
_EXPORTS = {"SearchError": "index", "build_index": "index", "Searcher": "query", "search": "query"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f"cnclip.search.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'cnclip.search' has no attribute {name!r}")
