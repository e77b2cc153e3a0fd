"""Writing files that are either complete and verified, or not there.

Everything distillm writes goes through three helpers:

- ``atomic_folder(final)``: a context manager that yields a staging folder beside ``final``; on success it
  writes ``manifest.json`` last (every file's size and SHA-256), flushes everything to disk and renames the
  folder into place; on any error (a full disk, Ctrl-C) it removes the staging folder and leaves ``final``
  as it was. ``publish_folder`` is the same last step for a staging folder that several processes filled
  (DeepSpeed's partitioned checkpoints).
- ``atomic_write_text(path, text)`` / ``atomic_write_bytes``: one file, written beside itself and renamed
  into place.
- ``verify_folder(folder)``: checks a folder against its manifest and returns what is wrong, file by file.

A folder is trusted only when its manifest matches (sizes and hashes, read in pieces of ``PIECE`` bytes);
see docs/faults.md. Writing errors the user can fix (no space left, a read-only or forbidden folder) become a
``StorageError`` that names the folder, the bytes needed and the bytes free.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from distillm.errors import UserError

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
PIECE = 8 << 20  # hash in 8 MiB pieces: a 14 GB checkpoint never sits in memory
EXIT_STORAGE = 74  # sysexits' EX_IOERR: the output could not be written (docs/faults.md)

# errno values a user fixes by freeing space, or by pointing the output elsewhere / fixing permissions.
_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_UNWRITABLE = {errno.EROFS, errno.EACCES, errno.EPERM}


class StorageError(UserError):
    """The output could not be written (disk full, read-only, no permission); nothing half-written is left."""

    exit_code = EXIT_STORAGE


# --------------------------------------------------------------------------------------------------------
# Manifests.


def file_digest(path: Path) -> str:
    """SHA-256 of ``path``, read in pieces of ``PIECE`` bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while piece := handle.read(PIECE):
            digest.update(piece)
    return digest.hexdigest()


def _files(folder: Path) -> list[Path]:
    return sorted(
        p for p in folder.rglob("*") if p.is_file() and p.relative_to(folder).as_posix() != MANIFEST
    )


def write_manifest(folder: str | Path) -> dict[str, Any]:
    """Record every file of ``folder`` (size and SHA-256) in ``folder/manifest.json``; call it last."""
    folder = Path(folder)
    files = {
        p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": file_digest(p)}
        for p in _files(folder)
    }
    manifest = {"version": MANIFEST_VERSION, "hash": "sha256", "files": files}
    temporary = folder / f".{MANIFEST}.tmp"
    temporary.write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    os.replace(temporary, folder / MANIFEST)
    return manifest


def manifest_bytes(folder: str | Path) -> int | None:
    """Total size of the files a folder's manifest lists, or None without a readable manifest."""
    try:
        manifest = json.loads((Path(folder) / MANIFEST).read_text(encoding="utf-8"))
        return sum(int(entry["size"]) for entry in manifest["files"].values())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def verify_folder(folder: str | Path, hashes: bool = True) -> list[str]:
    """What is wrong with ``folder`` against its manifest, one line per file; empty when it is intact.

    ``hashes=False`` checks presence and sizes only (cheap, for listing).
    """
    folder = Path(folder)
    path = folder / MANIFEST
    if not folder.is_dir():
        return [f"{folder}: not a folder"]
    if not path.is_file():
        return [f"{path}: missing (the folder is incomplete, or was not written by this distillm version)"]
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        files = manifest["files"]
        entries = [(name, int(entry["size"]), str(entry["sha256"])) for name, entry in files.items()]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        return [f"{path}: unreadable ({type(error).__name__}: {error})"]
    problems = []
    for name, size, sha256 in entries:
        file = folder / name
        if not file.is_file():
            problems.append(f"{file}: missing")
            continue
        actual = file.stat().st_size
        if actual != size:
            problems.append(f"{file}: {actual} bytes, the manifest says {size} (truncated or overwritten)")
        elif hashes and file_digest(file) != sha256:
            problems.append(f"{file}: its content differs from the manifest's SHA-256 (corrupted)")
    return problems


class DamagedError(UserError):
    """A folder's files do not match its manifest (truncated, corrupted, incomplete)."""


def require_intact(folder: str | Path, what: str, remedy: str) -> None:
    """Raise ``DamagedError`` naming every damaged file of ``folder`` (a ``what``) and saying ``remedy``."""
    problems = verify_folder(folder)
    if problems:
        raise DamagedError(f"{what} {folder} is damaged: " + "; ".join(problems) + f". {remedy}")


# --------------------------------------------------------------------------------------------------------
# Free space and writing errors.


def free_bytes(folder: str | Path) -> int:
    """Bytes free for this user in the file system holding ``folder`` (or its nearest existing parent)."""
    folder = Path(folder).absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return shutil.disk_usage(folder).free


def _size(count: int) -> str:
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if count < 1000 or unit == "TB":
            return f"{count} {unit}" if unit == "bytes" else f"{count:.1f} {unit}"
        count /= 1000  # type: ignore[assignment]
    raise AssertionError


def _storage_error(folder: Path, needed: int | None, error: OSError | None) -> StorageError:
    """``error`` None: the free space was checked before writing, and is short of ``needed``."""
    free = free_bytes(folder)
    room = f"{_size(free)} ({free} bytes) free there"
    if needed:
        room = f"it needs {'at least' if error is None else 'about'} {_size(needed)} ({needed} bytes), {room}"
    if error is None or error.errno in _FULL:
        return StorageError(f"not enough space in {folder}: {room}. Free space there")
    return StorageError(
        f"cannot write to {folder}: {error.strerror or error} ({room}). Make it writable (or mount it read-write)"
    )


def check_free_space(folder: str | Path, needed: int) -> None:
    """Refuse to start writing ``needed`` bytes into ``folder`` when fewer are free."""
    if free_bytes(folder) < needed:
        raise _storage_error(Path(folder), needed, None)


@contextlib.contextmanager
def storage_errors(folder: str | Path, needed: int | None = None) -> Iterator[None]:
    """Turn the OS errors a user can fix (no space, read-only, no permission) into a clear ``StorageError``.

    Other errors (a bug, a bad argument) pass unchanged. Torch's file writer reports a full disk as a
    ``RuntimeError`` without an errno; it is recognised by there being less than ``needed`` bytes free.
    """
    try:
        yield
    except OSError as error:
        if error.errno in _FULL | _UNWRITABLE:
            raise _storage_error(Path(folder), needed, error) from error
        raise
    except RuntimeError as error:
        text = str(error)
        torch_writer = (
            "unexpected pos" in text or "PytorchStreamWriter" in text or "file write failed" in text
        )
        if torch_writer and (needed is None or free_bytes(folder) < needed):
            raise _storage_error(Path(folder), needed, OSError(errno.ENOSPC, "no space left")) from error
        raise


# --------------------------------------------------------------------------------------------------------
# Atomic folders and files.


def _fsync_folder(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    _fsync_directory(folder)


def _fsync_directory(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every file system lets a directory be opened for fsync
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _old_name(final: Path) -> Path:
    return final.with_name(f".old-{final.name}")


def recover_replaced(final: str | Path) -> None:
    """Finish a replacement cut short between its two renames: ``final`` gone, its previous version aside."""
    final = Path(final)
    old = _old_name(final)
    if not final.exists() and old.is_dir():
        logger.warning("%s was being replaced when the process died: restoring the previous version", final)
        os.replace(old, final)


def publish_folder(staging: str | Path, final: str | Path) -> Path:
    """Write ``staging``'s manifest last, flush it to disk and rename it to ``final``, replacing an older one.

    A process killed at any moment leaves either the old ``final`` or the new one (or, between the two
    renames of a replacement, the old one under ``.old-<name>``, which ``recover_replaced`` puts back).
    """
    staging, final = Path(staging), Path(final)
    write_manifest(staging)
    _fsync_folder(staging)
    recover_replaced(final)
    if final.exists():
        old = _old_name(final)
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(staging, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, final)
    _fsync_directory(final.parent)
    return final


def remove_folder(folder: str | Path) -> None:
    """Delete ``folder`` so that a kill midway never leaves a half-deleted folder under its own name."""
    folder = Path(folder)
    if not folder.exists():
        return
    trash = folder.with_name(f".trash-{folder.name}")
    shutil.rmtree(trash, ignore_errors=True)
    os.replace(folder, trash)
    shutil.rmtree(trash, ignore_errors=True)


@contextlib.contextmanager
def atomic_folder(final: str | Path, replace: bool = True, needed: int | None = None) -> Iterator[Path]:
    """Yield a fresh staging folder beside ``final``; on success publish it (manifest last), on error delete it.

    ``replace=False`` keeps an existing intact ``final`` (another process that prepared the same cache won
    the race). ``needed``: bytes the folder will take, checked against the free space first and quoted if
    the disk fills anyway.
    """
    final = Path(final)
    with storage_errors(final.parent, needed):
        final.parent.mkdir(parents=True, exist_ok=True)
        if needed is not None:
            check_free_space(final.parent, needed)
        staging = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
    try:
        with storage_errors(final.parent, needed):
            yield staging
            if not replace and final.exists() and not verify_folder(final, hashes=False):
                shutil.rmtree(staging, ignore_errors=True)
                return
            publish_folder(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file beside it, flushed and renamed into place."""
    path = Path(path)
    with storage_errors(path.parent, len(data)):
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".tmp-{path.name}")
        try:
            with open(temporary, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, path)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` (UTF-8) atomically (``atomic_write_bytes``)."""
    return atomic_write_bytes(path, text.encode("utf-8"))
