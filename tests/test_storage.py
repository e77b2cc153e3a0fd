"""Atomic folders and files, manifests, and the errors of a full or unwritable disk."""

from __future__ import annotations

import errno
import hashlib
import json

import pytest

from distillm import storage
from distillm.storage import (
    MANIFEST,
    StorageError,
    atomic_folder,
    atomic_write_text,
    publish_folder,
    recover_replaced,
    storage_errors,
    verify_folder,
)


def make_folder(path, files: dict[str, bytes]):
    for name, data in files.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_bytes(data)
    return path


def test_the_manifest_lists_every_file_with_its_size_and_sha256(tmp_path, monkeypatch):
    monkeypatch.setattr(storage, "PIECE", 7)  # hashed in many pieces: the same digest as in one
    data = {"a.bin": bytes(range(200)), "sub/b.txt": b"hello"}
    with atomic_folder(tmp_path / "out") as staging:
        make_folder(staging, data)
    manifest = json.loads((tmp_path / "out" / MANIFEST).read_text())
    assert manifest["files"] == {
        name: {"size": len(content), "sha256": hashlib.sha256(content).hexdigest()}
        for name, content in data.items()
    }
    assert verify_folder(tmp_path / "out") == []


@pytest.mark.parametrize(
    ("damage", "says"),
    [
        (lambda f: f.write_bytes(f.read_bytes()[:-1]), "199 bytes, the manifest says 200"),
        (lambda f: f.write_bytes(b"\x01" + f.read_bytes()[1:]), "differs from the manifest's SHA-256"),
        (lambda f: f.unlink(), "missing"),
        (lambda f: (f.parent / MANIFEST).unlink(), "manifest.json: missing"),
        (lambda f: (f.parent / MANIFEST).write_text("{"), "manifest.json: unreadable"),
    ],
)
def test_verification_names_the_damaged_file_and_what_is_wrong(tmp_path, damage, says):
    with atomic_folder(tmp_path / "out") as staging:
        make_folder(staging, {"a.bin": bytes(range(200)), "b.bin": b"x"})
    damage(tmp_path / "out" / "a.bin")
    (problem,) = verify_folder(tmp_path / "out")
    assert says in problem and str(tmp_path / "out") in problem


def test_a_failure_inside_an_atomic_folder_leaves_the_old_folder_and_no_staging(tmp_path):
    with atomic_folder(tmp_path / "out") as staging:
        make_folder(staging, {"a": b"old"})
    with pytest.raises(KeyboardInterrupt), atomic_folder(tmp_path / "out") as staging:
        make_folder(staging, {"a": b"new"})
        raise KeyboardInterrupt
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert (tmp_path / "out" / "a").read_bytes() == b"old" and verify_folder(tmp_path / "out") == []


def test_replacing_a_folder_keeps_nothing_of_the_old_one(tmp_path):
    for files in ({"a": b"1", "b": b"2"}, {"c": b"3"}):
        with atomic_folder(tmp_path / "out") as staging:
            make_folder(staging, files)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["c", MANIFEST]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_replacement_cut_between_its_two_renames_is_undone(tmp_path):
    with atomic_folder(tmp_path / "best") as staging:
        make_folder(staging, {"a": b"1"})
    (tmp_path / "best").rename(tmp_path / ".old-best")  # killed right after the first rename
    recover_replaced(tmp_path / "best")
    assert verify_folder(tmp_path / "best") == []
    staging = make_folder(tmp_path / "staging", {"a": b"2"})
    (tmp_path / "best").rename(tmp_path / ".old-best")
    publish_folder(staging, tmp_path / "best")  # the next replacement also finds its way
    assert (tmp_path / "best" / "a").read_bytes() == b"2" and not (tmp_path / ".old-best").exists()


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
def test_a_full_disk_names_the_folder_the_bytes_needed_and_the_bytes_free(tmp_path, monkeypatch, code):
    monkeypatch.setattr(storage, "free_bytes", lambda folder: 1234)
    with pytest.raises(StorageError) as error, storage_errors(tmp_path, needed=5_000_000):
        raise OSError(code, "No space left on device")
    message = str(error.value)
    assert f"not enough space in {tmp_path}" in message
    assert "5000000 bytes" in message and "1234 bytes" in message and "free" in message


def test_a_read_only_folder_says_so(tmp_path, monkeypatch):
    monkeypatch.setattr(storage, "free_bytes", lambda folder: 0)
    with pytest.raises(StorageError, match=f"cannot write to {tmp_path}: Read-only file system"):
        with storage_errors(tmp_path, needed=10):
            raise OSError(errno.EROFS, "Read-only file system")


def test_other_errors_pass_unchanged(tmp_path):
    with pytest.raises(FileNotFoundError), storage_errors(tmp_path):
        raise FileNotFoundError(errno.ENOENT, "no such file")


def test_too_little_free_space_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    monkeypatch.setattr(storage, "free_bytes", lambda folder: 100)
    with pytest.raises(StorageError, match="needs at least"), atomic_folder(tmp_path / "out", needed=101):
        raise AssertionError("never reached")
    assert list(tmp_path.iterdir()) == []


def test_an_atomic_file_write_that_fails_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = atomic_write_text(tmp_path / "summary.json", "old")

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(storage.os, "fsync", full)
    with pytest.raises(StorageError):
        atomic_write_text(path, "new")
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["summary.json"]
