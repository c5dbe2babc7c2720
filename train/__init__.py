"""cnclip.train: two-stage Chinese CLIP training on cnclip corpus shards (see issue 4)."""
