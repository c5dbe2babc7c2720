"""A careless user's bad inputs: one line and exit code 2. An internal bug: its traceback, never swallowed."""

import errno
import socket

import pytest
import torch
from typer.testing import CliRunner

from cnclip.cli import app
from cnclip.corpus.sources.sample_web import SampleWebError, SampleWebServer
from cnclip.train.checkpoint import FORMAT, CheckpointError, load_checkpoint, save_checkpoint
from test_train_support import shape_samples, write_config, write_shards

runner = CliRunner()


def error_lines(result) -> list[str]:
    return [line for line in result.output.splitlines() if line.strip()]


def one_line_error(result) -> str:
    assert result.exit_code == 2, result.output
    lines = error_lines(result)
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


class OpensAFile:
    """Unpickling this would create a file: what a malicious 'checkpoint' does with weights_only=False."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (str(self.path), "w")


@pytest.fixture(scope="module")
def bad_checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_ckpts")
    good = save_checkpoint(root / "good.pt", {"model": {"w": torch.zeros(4096)}, "stage": 1})
    raw = good.read_bytes()
    (root / "truncated.pt").write_bytes(raw[: len(raw) // 2])
    (root / "empty.pt").write_bytes(b"")
    (root / "notes.pt").write_text("not a checkpoint at all\n")
    torch.save([1, 2, 3], root / "list.pt")
    torch.save({"format": FORMAT, "payload": OpensAFile(root / "pwned")}, root / "pickle.pt")
    return root


CASES = {"truncated.pt": "(", "empty.pt": "(", "notes.pt": "(", "list.pt": "(not a cnclip training checkpoint)",
         "pickle.pt": "(Weights only load failed", "missing.pt": "(no such file)"}


@pytest.mark.parametrize("name", sorted(CASES))
def test_load_checkpoint_refuses_what_is_not_one(bad_checkpoints, name):
    path = bad_checkpoints / name
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"not a loadable checkpoint: {path} {CASES[name]}"), message
    assert not (bad_checkpoints / "pwned").exists()  # the pickle's code never ran


@pytest.mark.parametrize("name", ["truncated.pt", "empty.pt", "pickle.pt", "list.pt"])
def test_eval_and_export_say_not_a_loadable_checkpoint(bad_checkpoints, tmp_path, name):
    path = bad_checkpoints / name
    for argv in (["eval", str(path), "--data", str(tmp_path / "x.tar")], ["export", str(path), str(tmp_path / "e")]):
        line = one_line_error(runner.invoke(app, argv))
        assert line.startswith(f"error: not a loadable checkpoint: {path} (")
    assert not (tmp_path / "e").exists() and not (bad_checkpoints / "pwned").exists()


@pytest.fixture(scope="module")
def small_shards(tmp_path_factory):
    return write_shards(tmp_path_factory.mktemp("few"), shape_samples(32, seed=3), per_shard=32)


def test_train_resume_from_a_damaged_checkpoint(bad_checkpoints, small_shards, tmp_path):
    config = write_config(tmp_path, small_shards)
    for name in ("truncated.pt", "pickle.pt"):
        path = bad_checkpoints / name
        line = one_line_error(runner.invoke(app, ["train", config, "--resume", str(path)]))
        assert line.startswith(f"error: not a loadable checkpoint: {path} (")
    line = one_line_error(runner.invoke(app, ["train", config, "--resume", "latest"]))
    assert line == f"error: {tmp_path / 'run'}/checkpoints: no checkpoint to resume"


@pytest.mark.parametrize("workers", [0, 1])
def test_unreadable_training_shards_are_one_line(tmp_path, workers):
    (tmp_path / "empty.tar").write_bytes(b"")
    (tmp_path / "junk.tar").write_bytes(b"\x00garbage" * 100)
    shards = [str(tmp_path / "empty.tar"), str(tmp_path / "junk.tar")]
    config = write_config(tmp_path, shards, tokenizer={"vocab": "bert-base-chinese"},
                          data={"train": shards, "workers": workers, "shuffle_buffer": 0})
    line = one_line_error(runner.invoke(app, ["train", config]))
    assert line.startswith("error: data: none of worker slot 0's shards gave a sample: "), line
    assert str(tmp_path / "empty.tar") in line


def test_a_config_naming_a_missing_vocab_is_one_line(small_shards, tmp_path):
    config = write_config(tmp_path, small_shards, tokenizer={"vocab": str(tmp_path / "no-vocab.txt")})
    line = one_line_error(runner.invoke(app, ["train", config]))
    assert line == f"error: {tmp_path / 'no-vocab.txt'}: cannot read the vocab (No such file or directory)"


def metadata_recipe(tmp_path, **paths) -> str:
    import polars as pl

    pl.DataFrame({"url": ["http://127.0.0.1/a.jpg"], "caption": ["一只猫在沙发上睡觉"]}).write_parquet(
        tmp_path / "m.parquet")
    out, manifests = paths.get("output_dir", tmp_path / "o"), paths.get("manifest_dir", tmp_path / "m")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: r\noutput_dir: {out}\nmanifest_dir: {manifests}\n"
                      f"sources:\n  - {{name: m, kind: metadata, path: {tmp_path}/m.parquet}}\n"
                      "text: {processes: 1}\n", encoding="utf-8")
    return str(recipe)


def test_corpus_user_errors_are_one_line(tmp_path):
    line = one_line_error(runner.invoke(app, ["corpus", "stats", str(tmp_path / "nowhere")]))
    assert line == f"error: {tmp_path / 'nowhere'}: no samples/ or rejected/ manifests here"
    (tmp_path / "a-file").write_text("mine\n")
    recipe = metadata_recipe(tmp_path, output_dir=tmp_path / "a-file" / "out")
    line = one_line_error(runner.invoke(app, ["corpus", "text", recipe]))
    assert str(tmp_path / "a-file") in line
    assert (tmp_path / "a-file").read_text() == "mine\n"
    line = one_line_error(runner.invoke(app, ["corpus", "download", metadata_recipe(tmp_path), "--retry-failed"]))
    assert line == "error: r: --retry-failed needs a completed download stage; run it first"
    line = one_line_error(runner.invoke(app, ["corpus", "hash-eval", str(tmp_path),
                                              "--out", str(tmp_path / "h.parquet"), "--size", "0"]))
    assert line.startswith("error: hash-eval: size: ")
    line = one_line_error(runner.invoke(app, ["corpus", "hash-eval", str(tmp_path / "none"), "--out",
                                              str(tmp_path / "h.parquet")]))
    assert line == f"error: {tmp_path / 'none'}: no such folder, tar or glob of tars"


def test_a_busy_sample_web_port_is_a_user_error(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(SampleWebError, match=f"cannot listen on 127.0.0.1:{port} .*set the source's `port`"):
            SampleWebServer(tmp_path, port)


def test_internal_bugs_keep_their_traceback(tmp_path, monkeypatch, small_shards):
    """What the CLIs used to swallow as 'user errors' (OSError, RuntimeError, ValueError) now surfaces."""
    import cnclip.corpus.manifests.stats as stats
    import cnclip.corpus.pipeline as pipeline
    import cnclip.train.loop as loop

    def bug(*args, **kwargs):
        raise KeyError("internal")

    monkeypatch.setattr(pipeline, "run_text", bug)
    result = runner.invoke(app, ["corpus", "text", metadata_recipe(tmp_path)])
    assert result.exit_code == 1 and isinstance(result.exception, KeyError)

    def io_bug(*args, **kwargs):
        raise OSError(errno.EIO, "Input/output error")  # no file named: not the user's to fix

    monkeypatch.setattr(stats, "corpus_stats", io_bug)
    result = runner.invoke(app, ["corpus", "stats", str(tmp_path)])
    assert result.exit_code == 1 and isinstance(result.exception, OSError)

    monkeypatch.setattr(loop, "train", lambda *a, **k: (_ for _ in ()).throw(ValueError("a bug in the loop")))
    result = runner.invoke(app, ["train", write_config(tmp_path / "t", small_shards)])
    assert result.exit_code == 1 and isinstance(result.exception, ValueError)


def test_train_into_an_unwritable_output_dir_is_one_line(small_shards, tmp_path):
    (tmp_path / "a-file").write_text("mine\n")
    config = write_config(tmp_path, small_shards, output_dir=str(tmp_path / "a-file" / "run"))
    line = one_line_error(runner.invoke(app, ["train", config]))
    assert line == f"error: output_dir: cannot write {tmp_path / 'a-file' / 'run'} (Not a directory)"
    assert (tmp_path / "a-file").read_text() == "mine\n"


def test_a_phash_list_that_is_not_parquet_is_one_line(tmp_path):
    from cnclip.corpus.ops.eval_hashes import EvalSetError, load_eval_hashes
    from cnclip.corpus.recipe import ImageSettings

    (tmp_path / "list.parquet").write_text("id,phash\n")
    with pytest.raises(EvalSetError, match=f"^{tmp_path / 'list.parquet'}: cannot read the pHash list "):
        load_eval_hashes([str(tmp_path / "list.parquet")], ImageSettings())


def test_class_name_and_vocab_files_that_cannot_be_used_are_one_line(tmp_path):
    from cnclip.train.clip_benchmark import read_class_names
    from cnclip.train.data import DataError
    from cnclip.train.tokenizer import ChineseTokenizer, TokenizerError

    with pytest.raises(DataError, match=f"^{tmp_path / 'classes.txt'}: cannot read \\(No such file or directory\\)$"):
        read_class_names(tmp_path / "classes.txt")
    (tmp_path / "vocab.txt").write_text("[PAD]\n[UNK]\n猫\n", encoding="utf-8")
    with pytest.raises(TokenizerError, match=f"^{tmp_path / 'vocab.txt'}: vocab lacks the special tokens "
                                             r"\[CLS\], \[SEP\], \[MASK\]$"):
        ChineseTokenizer.from_file(tmp_path / "vocab.txt")


def test_export_onto_a_file_is_one_line(tmp_path, small_shards):
    from cnclip.train.loop import train
    from test_train_support import tiny_config

    train(tiny_config(tmp_path, small_shards, batch_size=8, stage1={"steps": 1}, stage2={"steps": 1}), stage="1")
    (tmp_path / "taken").write_text("mine\n")
    line = one_line_error(runner.invoke(app, ["export", str(tmp_path / "run/checkpoints/stage1-final.pt"),
                                              str(tmp_path / "taken")]))
    assert line == f"error: {tmp_path / 'taken'}: cannot write the export (File exists)"
    assert (tmp_path / "taken").read_text() == "mine\n"
