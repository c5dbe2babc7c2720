"""cnclip: Chinese image-text corpora at LAION scale, and Chinese CLIP training on them."""

__version__ = "0.1.0"
