"""cnclip._common.atomic: the one writer every stage, record and checkpoint goes through."""

import json
import os
from pathlib import Path

import pytest

import cnclip._common.atomic as atomic
from cnclip._common.atomic import atomic_path, remove_temporaries, temporary_name, write_json_atomic, write_text_atomic


def test_json_is_utf8_indented_and_readable_by_people(tmp_path):
    payload = {"名字": "一只猫", "counts": {"samples": 3, "rejected": [1, 2]}}
    path = tmp_path / "new" / "folder" / "record.json"
    write_json_atomic(path, payload)
    text = path.read_text(encoding="utf-8")
    assert text == json.dumps(payload, ensure_ascii=False, indent=2)
    assert '"名字": "一只猫"' in text and '\n  "counts": {\n    "samples": 3,' in text
    assert json.loads(text) == payload
    assert sorted(p.name for p in path.parent.iterdir()) == ["record.json"]


def test_a_failed_write_keeps_the_previous_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "part.bin"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="crash"):
        with atomic_path(path) as tmp:
            assert tmp == temporary_name(path) == tmp_path / f".part.bin.tmp{os.getpid()}"
            tmp.write_bytes(b"half")
            raise RuntimeError("crash")
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["part.bin"]


@pytest.fixture
def fsyncs(monkeypatch):
    """The paths fsync'd, in order, and whether every descriptor opened for it was closed."""
    calls, opened = [], {}
    real_open, real_close = os.open, os.close

    def fake_open(path, flags, *args):
        fd = real_open(path, flags, *args)
        opened[fd] = Path(path)
        return fd

    def fake_close(fd):
        opened.pop(fd, None)
        real_close(fd)

    monkeypatch.setattr(atomic.os, "open", fake_open)
    monkeypatch.setattr(atomic.os, "close", fake_close)
    monkeypatch.setattr(atomic.os, "fsync", lambda fd: calls.append(opened[fd]))
    return calls, opened


def test_durable_writes_flush_the_file_then_its_folder(tmp_path, fsyncs):
    calls, opened = fsyncs
    path = tmp_path / "latest.txt"
    write_text_atomic(path, "stage1-final.pt\n", durable=True)
    assert calls == [temporary_name(path), tmp_path]
    write_json_atomic(tmp_path / "run.json", {"a": 1}, durable=True)
    assert calls[2:] == [temporary_name(tmp_path / "run.json"), tmp_path]
    assert opened == {}  # every descriptor closed
    assert path.read_text(encoding="utf-8") == "stage1-final.pt\n"


def test_plain_writes_do_not_flush(tmp_path, fsyncs):
    calls, _ = fsyncs
    write_text_atomic(tmp_path / "a.txt", "x")
    write_json_atomic(tmp_path / "b.json", [1])
    assert calls == []


def test_a_platform_that_cannot_flush_a_folder_does_not_fail_the_write(tmp_path, monkeypatch):
    closed = []
    real_close = os.close

    def refuse(fd):
        raise OSError("fsync of a folder not supported")

    monkeypatch.setattr(atomic.os, "fsync", refuse)
    monkeypatch.setattr(atomic.os, "close", lambda fd: (closed.append(fd), real_close(fd)))
    write_text_atomic(tmp_path / "a.txt", "kept", durable=True)
    assert (tmp_path / "a.txt").read_text(encoding="utf-8") == "kept"
    assert len(closed) == 2
    atomic._fsync(tmp_path / "no-such-file")  # cannot be opened: nothing to flush, no error


def test_remove_temporaries_takes_only_a_crashed_writers_leftovers(tmp_path, monkeypatch):
    leftovers = [tmp_path / ".p-0.parquet.tmp123", tmp_path / ".00001.tar.tmp9"]
    kept = [tmp_path / "p-0.parquet", tmp_path / ".hidden", tmp_path / "x.tmp1"]
    for path in leftovers + kept:
        path.write_bytes(b"x")
    remove_temporaries(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in kept)
    remove_temporaries(tmp_path / "absent")  # no folder yet: nothing to do
    # A leftover that another process removed between the listing and the unlink is no error.
    monkeypatch.setattr(Path, "glob", lambda self, pattern: iter([self / ".gone.tmp1"]))
    remove_temporaries(tmp_path)
