"""cnclip.embed: image and text embeddings of a corpus with a local Chinese CLIP model.

    from cnclip.embed import load_encoder
    encoder = load_encoder("runs/demo/checkpoints/stage2-final.pt")
    texts = encoder.encode_texts(["红色的圆形"])        # [n, dim] float32, L2-normalized
    images = encoder.encode_images([PIL.Image.open(...)])

encoder.py loads the model (one function per checkpoint kind) and batches; store.py is the
embeddings artifact the corpus build writes (float16 Parquet parts keyed by uid) and what the
CLIP-score filter, semantic dedup and search read.
"""
