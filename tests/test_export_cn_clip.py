"""`cnclip corpus export-cn-clip`: a built corpus in Chinese-CLIP's TSV + JSONL layout, read back by
Chinese-CLIP's own LMDB builder."""

import base64
import json
import pickle
import subprocess
import sys
import tarfile
from pathlib import Path

import lmdb
import polars as pl
import pytest
from typer.testing import CliRunner

from cnclip.corpus.cli import app
from cnclip.corpus.manifests.export_cn_clip import MARKER, CnClipExportError, export_cn_clip


def _tar_members(shards: Path) -> dict[str, bytes]:
    members = {}
    for path in sorted(shards.glob("*.tar")):
        with tarfile.open(path) as tar:
            members.update({m.name: tar.extractfile(m).read() for m in tar if m.isfile()})
    return members


def _read(out: Path, split: str):
    images = dict(line.split("\t") for line in (out / f"{split}_imgs.tsv").read_text().splitlines())
    texts = [json.loads(line) for line in (out / f"{split}_texts.jsonl").read_text(encoding="utf-8").splitlines()]
    return {int(k): base64.b64decode(v) for k, v in images.items()}, texts


def test_export_holds_the_shards_bytes_and_the_captions(demo_corpus, tmp_path):
    manifests = demo_corpus / "manifests"
    out = tmp_path / "cn"
    result = CliRunner().invoke(app, ["export-cn-clip", str(manifests), str(out)])
    assert result.exit_code == 0, result.output
    samples = pl.read_parquet(manifests / "samples" / "*.parquet").sort("uid")
    members = _tar_members(demo_corpus / "data" / "shards")
    images, texts = _read(out, "train")
    ids = pl.read_parquet(out / "train_ids.parquet")
    assert len(texts) == samples.height == ids.height
    assert [t["text_id"] for t in texts] == list(range(samples.height))
    assert [t["text"] for t in texts] == samples["caption"].to_list()
    by_uid = dict(zip(ids["uid"].to_list(), ids["image_id"].to_list(), strict=True))
    for row, text in zip(samples.iter_rows(named=True), texts, strict=True):
        assert text["image_ids"] == [by_uid[row["uid"]]]
        stored = next(v for k, v in members.items() if k.split(".")[0] == row["key"] and not k.endswith((".txt", ".json")))
        assert images[by_uid[row["uid"]]] == stored
        assert members[row["key"] + ".txt"].decode() == text["text"]
    assert len(images) == samples["sha256"].n_unique()
    assert ids.select("text_id", "uid", "key").rows() == [(i, u, k) for i, (u, k) in
                                                          enumerate(samples.select("uid", "key").rows())]

    # Chinese-CLIP's own builder reads it, and its LMDB holds our images and pairs.
    built = subprocess.run([sys.executable, "-m", "cn_clip.preprocess.build_lmdb_dataset", "--data_dir", str(out),
                            "--splits", "train"], capture_output=True, text=True, cwd=tmp_path)
    assert built.returncode == 0, built.stderr
    with lmdb.open(str(out / "lmdb" / "train" / "imgs"), readonly=True, lock=False) as env, env.begin() as txn:
        assert int(txn.get(b"num_images")) == len(images)
        some = sorted(images)[len(images) // 2]
        assert base64.b64decode(txn.get(str(some).encode())) == images[some]
    with lmdb.open(str(out / "lmdb" / "train" / "pairs"), readonly=True, lock=False) as env, env.begin() as txn:
        assert int(txn.get(b"num_samples")) == len(texts)
        image_id, text_id, text = pickle.loads(txn.get(b"3"))
        assert (image_id, text_id, text) == (texts[3]["image_ids"][0], texts[3]["text_id"], texts[3]["text"])


def test_images_sharing_a_sha256_are_written_once(demo_corpus, tmp_path):
    """A corpus built without exact dedup can hold one image under several samples."""
    manifests = tmp_path / "manifests"
    (manifests / "samples").mkdir(parents=True)
    source = demo_corpus / "manifests"
    parts = sorted((source / "samples").glob("*.parquet"))
    first = pl.read_parquet(parts[0])
    shared = first["sha256"][0]
    first.with_columns(pl.when(pl.int_range(pl.len()) < 3).then(pl.lit(shared)).otherwise(pl.col("sha256"))
                       .alias("sha256")).write_parquet(manifests / "samples" / parts[0].name)
    for part in parts[1:]:
        (manifests / "samples" / part.name).write_bytes(part.read_bytes())
    funnel = json.loads((source / "funnel.json").read_text())
    funnel["shards_dir"] = str((source / funnel["shards_dir"]).resolve())
    (manifests / "funnel.json").write_text(json.dumps(funnel))
    counts = export_cn_clip(manifests, tmp_path / "cn")
    images, texts = _read(tmp_path / "cn", "train")
    assert [t["image_ids"] for t in texts[:4]] == [[0], [0], [0], [1]]
    assert counts["train"] == {"images": len(images), "texts": len(texts)} and len(images) == len(texts) - 2
    members = _tar_members(demo_corpus / "data" / "shards")
    key0 = first["key"][0]
    assert images[0] == next(v for k, v in members.items() if k.startswith(key0 + ".") and not k.endswith((".txt", ".json")))


def test_valid_split_is_by_image_deterministic_and_reruns_replace_only_the_export(demo_corpus, tmp_path):
    manifests, out = demo_corpus / "manifests", tmp_path / "cn"
    counts = export_cn_clip(manifests, out, valid_fraction=0.3, seed=7)
    train_images, train_texts = _read(out, "train")
    valid_images, valid_texts = _read(out, "valid")
    assert counts["valid"]["images"] == len(valid_images) > 0 and counts["train"]["texts"] == len(train_texts)
    assert not set(train_images) & set(valid_images)
    assert {i for t in valid_texts for i in t["image_ids"]} == set(valid_images)
    again = tmp_path / "again"
    export_cn_clip(manifests, again, valid_fraction=0.3, seed=7)
    assert (again / "valid_texts.jsonl").read_bytes() == (out / "valid_texts.jsonl").read_bytes()
    export_cn_clip(manifests, again, valid_fraction=0.3, seed=8)
    assert (again / "valid_texts.jsonl").read_bytes() != (out / "valid_texts.jsonl").read_bytes()

    # A rerun without the held-out split removes the earlier export's valid files, nothing else.
    (out / "lmdb").mkdir()
    (out / "notes.txt").write_text("mine")
    export_cn_clip(manifests, out)
    assert not (out / "valid_imgs.tsv").exists() and (out / "notes.txt").read_text() == "mine"
    assert json.loads((out / MARKER).read_text())["files"] == ["train_imgs.tsv", "train_texts.jsonl",
                                                               "train_ids.parquet"]


def test_a_users_folder_is_refused_and_left_alone(demo_corpus, tmp_path):
    out = tmp_path / "photos"
    out.mkdir()
    (out / "train_imgs.tsv").write_text("my own file")
    result = CliRunner().invoke(app, ["export-cn-clip", str(demo_corpus / "manifests"), str(out)])
    assert result.exit_code == 2
    assert result.output.strip() == (f"error: {out}: not empty and not a previous cn_clip export (no {MARKER}); "
                                     "choose an empty or new folder")
    assert (out / "train_imgs.tsv").read_text() == "my own file" and len(list(out.iterdir())) == 1
    bad = CliRunner().invoke(app, ["export-cn-clip", str(tmp_path / "nothing"), str(tmp_path / "x")])
    assert bad.exit_code == 2 and "not a finished build" in bad.output and not (tmp_path / "x").exists()
    with pytest.raises(CnClipExportError, match=r"--valid-fraction: 1.0 is not in \[0, 1\)"):
        export_cn_clip(demo_corpus / "manifests", tmp_path / "y", valid_fraction=1.0)
