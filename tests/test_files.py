"""captioning.files: whole-or-nothing writes, the one-writer lock and its fallbacks, UTF-8 errors with their line."""

from __future__ import annotations

import errno
import logging
from pathlib import Path

import pytest

from captioning import files


def test_write_whole_replaces_every_file_or_none(tmp_path, monkeypatch):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    files.write_whole({a: "a1", b: "b1"})
    assert (a.read_text(), b.read_text()) == ("a1", "b1")
    write_text = Path.write_text

    def full_at_b(path, text, *args, **kwargs):
        if "b.json" in path.name:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return write_text(path, text, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full_at_b)
    with pytest.raises(OSError) as info:
        files.write_whole({a: "a2", b: "b2"})
    assert info.value.filename == str(b) and info.value.errno == errno.ENOSPC  # the target, not its temp file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.json"]
    assert (a.read_text(), b.read_text()) == ("a1", "b1")  # a was written, but not put in place without b


def test_lock_exclusive_refuses_a_second_writer_and_goes_on_where_locks_are_missing(tmp_path, monkeypatch, caplog):
    path = tmp_path / "out.jsonl"
    with open(path, "a") as first, open(path, "a") as second:
        files.lock_exclusive(first, "busy")
        with pytest.raises(ValueError, match="^busy$"):
            files.lock_exclusive(second, "busy")
    with open(path, "a") as again:  # closing the first released the lock
        files.lock_exclusive(again, "busy")

    def no_locks(*args):  # NFS without lockd, Lustre without -o flock
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(files.fcntl, "flock", no_locks)
    with caplog.at_level(logging.WARNING, logger="captioning.files"), open(path, "a") as f:
        files.lock_exclusive(f, "busy")
    assert f"{path} cannot be locked (No locks available)" in caplog.text
    monkeypatch.setattr(files, "fcntl", None)  # Windows
    with open(path, "a") as f:
        files.lock_exclusive(f, "busy")


def test_not_utf8_error_names_the_file_the_line_and_the_fix(tmp_path):
    path = tmp_path / "captions.txt"
    error = files.not_utf8_error(path, "first line\ncaf\u00e9\n".encode("latin-1"))
    assert str(error) == f"{path}:2: not UTF-8 text (byte 0xe9); save the file as UTF-8"
    assert str(files.not_utf8_error(path, b"\xff", "delete it")) == f"{path}:1: not UTF-8 text (byte 0xff); delete it"
